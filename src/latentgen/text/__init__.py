"""Conditioning encoders τθ and their offline tokenizers (LDM, Rombach et al. arXiv 2112.10752, Sec. 3.3).

τθ maps a prompt (or a class label) to the context y the UNet's cross-attention attends to. Four kinds:

- ``clip``      SD 1.x ``FrozenCLIPEmbedder``: the CLIP text transformer (transformers ``CLIPTextModel``, written
                out here with its module names; quick_gelu), output = last hidden state after
                ``final_layer_norm``. Tokens padded with ``<|endoftext|>`` (49407).
- ``open_clip`` SD 2.x ``FrozenOpenCLIPEmbedder``: the OpenCLIP text tower converted to the same layout (exact gelu);
                with ``layer="penultimate"`` the output is ``ln_final`` applied to the output of the
                second-to-last block. Tokens padded with 0.
- ``bert``      CompVis latent-diffusion ``BERTEmbedder``: an x-transformers encoder written out here with the
                checkpoint's module names (pre-norm, no mask, exact-GELU feed-forward), output = final norm.
- ``class``     ``ClassEmbedder``: ``nn.Embedding(n_classes, embed_dim)``, context ``[B, 1, D]``.
- ``none``      unconditional models: ``encode`` returns ``None``.

Weights are held in the layout of the original single-file checkpoints without the ``cond_stage_model.`` prefix
(``transformer.text_model.*`` for both CLIP kinds, x-transformers names for BERT, ``embedding.weight`` for classes),
so ``original_state_dict()`` is what our own checkpoints store.

References: CompVis/stable-diffusion and CompVis/latent-diffusion ``ldm/modules/encoders/modules.py`` and
``ldm/modules/x_transformer.py``; Stability-AI/stablediffusion ``FrozenOpenCLIPEmbedder``; open_clip
``SimpleTokenizer`` (vocabulary construction); transformers ``CLIPTextModel`` / ``CLIPTokenizer`` / ``BertTokenizer``,
whose tokenizer pipelines are rebuilt here with ``tokenizers``. latentgen does not import transformers at run time
(its import costs 1.5-4 s per process); the tests compare against it.
"""

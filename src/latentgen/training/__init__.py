"""Training: the first-stage autoencoder and the latent diffusion model (Rombach et al., arXiv 2112.10752).

- `train_autoencoder`: the LDM first stage (paper Sec. 3.1, App. G): L1 reconstruction + perceptual loss +
  patch-based adversarial loss (PatchGAN `NLayerDiscriminator`, Isola et al. arXiv 1611.07004, as in
  taming-transformers; hinge loss; adaptive weight = ||∇L_rec|| / ||∇L_GAN|| at the decoder's last layer,
  Esser et al. arXiv 2012.09841 Eq. 7) + a small KL penalty (KL-reg) or the VQ codebook/commitment loss
  (VQ-reg). Perceptual loss: LPIPS (Zhang et al. arXiv 1801.03924) when VGG16 weights are given, else the
  Laplacian-pyramid L1 loss of Bojanowski et al. (arXiv 1707.05776, Eq. 3), which needs no pretrained net.
- `train_ldm`: ε- or v-prediction (`denoiser.training_loss`, paper Eq. 2 / Eq. 3) on the frozen
  autoencoder's latents scaled to unit variance (scale factor = 1 / std of the latents, paper Sec. 4.3.2),
  with no / class / text (BERT, trained jointly) conditioning, concat conditioning for super-resolution
  and inpainting, and condition dropout for classifier-free guidance (Ho & Salimans arXiv 2207.12598).

Both share one loop: EMA weights (CompVis LitEma), periodic checkpoints (loading.bundle.save_model layout, EMA
weights) plus a training-state file (safetensors + JSON metadata, never pickle), exact resume, a checkpoint
on SIGINT / SIGTERM, and data parallelism under torchrun.

Determinism: everything random about a step is a function of (seed, step): the global batch is a slice of
a per-epoch permutation, and the global batch is cut into micro-batches of `micro_batch` samples, each with
its own generator seeded by (seed, step, micro-batch index). Under torchrun rank r takes micro-batches
r, r + W, ... (disjoint slices of the same global batch) and gradients are averaged across ranks, so W
processes compute what one process computes with the same global batch and micro-batch size (one process
accumulates the micro-batches' gradients). Resuming needs nothing but the step.
"""

"""Prompt editing and alternation, as AUTOMATIC1111 schedules them: the parse, the per-step prompt list, and the
conditioning each model call of a sampler uses.

Syntax (A1111's ``modules/prompt_parser.py`` grammar and ``get_learned_conditioning_prompt_schedules``, written anew
here without its lark parser):

- ``[from:to:when]`` reads ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to`` after
  ``when``; ``[from::when]`` removes ``from`` after ``when``. ``when`` with a decimal point (``0.25``, ``.5``,
  ``1.0``) is a fraction of the steps, int(when × steps); without one (``10``) a step number. Edits nest, in either
  part, and inside the attention syntax's brackets: ``(a [b:c:5]:1.2)``, ``[a:[b:c:8]:4]``.
- ``[a|b|c]`` alternates, ``a`` at step 1, ``b`` at step 2, ... (``[fe|]male``: an empty option).
- Everything else is kept as written, so the attention syntax (text.prompts.parse_attention) reads each scheduled
  text unchanged: ``(x)``, ``(x:1.2)``, ``[x]`` and ``\\`` escapes survive the schedule.
- Malformed input never fails: a bracket that does not open a complete construct is kept as text (``a [b`` or
  ``((a][:b``), and a prompt the grammar rejects as a whole (a ``|`` outside ``[...]``, a trailing ``\\``) is one
  unscheduled text, as in A1111.
- The hires fix's second pass (A1111 >= 1.6, ``hires_steps``): ``when`` counts on from the first pass, so a step
  number subtracts the first pass's steps and a fraction subtracts 1 (``[a:b:1.5]`` switches half-way through
  the second pass; ``[a:b:0.5]`` is ``b`` throughout it).

The result for a prompt is A1111's list of (until step, text), steps 1..N: ``[[cat:dog:0.5]`` at 10 steps is
``[(5, "cat"), (10, "dog")]``.

Sampling follows A1111's ``CFGDenoiser`` (``modules/sd_samplers_cfg_denoiser.py``, ``forward``): its ``step`` counts
MODEL CALLS, not sampler steps: it starts at 0 when a sampling run starts (``sd_samplers_common.Sampler.initialize``)
and ``forward`` adds 1 after every call, so a second-order sampler advances it twice per step. Call ``k`` uses the
first entry with ``k <= until`` (``prompt_parser.reconstruct_cond_batch``; none: the first entry). To keep the
switch at the same place in the run, the schedule of a sampler A1111 marks ``second_order`` (Heun, DPM2, DPM2 a,
DPM++ 2S a, DPM++ SDE: ``sd_samplers_kdiffusion.samplers_k_diffusion``) is made over twice the steps
(``SamplerData.total_steps``, used by ``processing.setup_conds``). img2img, inpainting and the hires pass use the
schedule of the full step count but start counting at 0 at the first step they run (A1111's ``sample_img2img``
runs the tail of the σ schedule with the counter reset), so with strength s only the first ≈ s·N entries are
reached. The SDXL refiner continues the base's count (A1111's ``apply_refiner`` swaps the model, not the counter).

Each distinct text of a batch's schedules is encoded once; :class:`ScheduledModel` hands each model call the rows
of the encoded table its items are at. A batch whose prompts have no edits never comes here (bit-identical images).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# A1111's sd_samplers_kdiffusion: the samplers whose SamplerData.total_steps doubles the step count
SECOND_ORDER = frozenset({"heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde"})

# lark's common.SIGNED_NUMBER (the grammar's NUMBER), as its dynamic lexer matches it: one regex match, no backtrack
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_WHITESPACE = re.compile(r"\s+")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # no DOTALL: a backslash before a newline is not text
_STRAY = "[]():"  # characters the top level may hold outside any construct


@dataclass
class _Edit:
    """``[before:after:when]``; before None for ``[after:when]``."""

    before: list | None
    after: list
    number: str  # the NUMBER token as written ("." decides fraction or step)


@dataclass
class _Alternate:
    options: list[list]


class _Malformed(Exception):
    """The grammar rejects the prompt as a whole (A1111 then uses it unscheduled)."""


def _prompt(text: str, i: int) -> tuple[list, int]:
    """The grammar's ``prompt`` from i: plain text, whitespace and bracket constructs, up to a ``:`` ``|`` ``)``
    ``]`` or the end. Inside a construct there is no stray text: a bracket that does not close properly fails it."""
    nodes: list = []
    while i < len(text):
        c = text[i]
        if c in "[(":
            node, i = _construct(text, i)
            if node is None:
                raise _Malformed
            nodes.extend(node)
            continue
        if c in ":|)]":
            break
        m = _PLAIN.match(text, i)
        if m is None:  # a backslash at the end or before a newline
            raise _Malformed
        nodes.append(m.group(0))
        i = m.end()
    return nodes, i


def _number_close(text: str, i: int) -> tuple[str, int] | None:
    """``[WHITESPACE] NUMBER [WHITESPACE] "]"`` at i: (the number, the index after ``]``)."""
    m = _WHITESPACE.match(text, i)
    i = m.end() if m else i
    m = _NUMBER.match(text, i)
    if m is None:
        return None
    number, i = m.group(0), m.end()
    m = _WHITESPACE.match(text, i)
    i = m.end() if m else i
    return (number, i + 1) if text.startswith("]", i) else None


def _construct(text: str, i: int) -> tuple[list | None, int]:
    """The emphasis, edit or alternation that opens at text[i] (``(`` or ``[``) as nodes, and the index after it;
    (None, i) when no complete construct opens there."""
    try:
        first, j = _prompt(text, i + 1)
        if text[i] == "(":
            if text.startswith(":", j):
                second, j = _prompt(text, j + 1)
                if text.startswith(")", j):
                    return ["(", *first, ":", *second, ")"], j + 1
            elif text.startswith(")", j):
                return ["(", *first, ")"], j + 1
            return None, i
        if text.startswith("]", j):
            return ["[", *first, "]"], j + 1
        if text.startswith("|", j):
            options = [first]
            while text.startswith("|", j):
                option, j = _prompt(text, j + 1)
                options.append(option)
            return ([_Alternate(options)], j + 1) if text.startswith("]", j) else (None, i)
        if text.startswith(":", j):
            closed = _number_close(text, j + 1)
            if closed is not None:
                return [_Edit(None, first, closed[0])], closed[1]
            second, j = _prompt(text, j + 1)
            if text.startswith(":", j):
                closed = _number_close(text, j + 1)
                if closed is not None:
                    return [_Edit(first, second, closed[0])], closed[1]
        return None, i
    except _Malformed:
        return None, i


def parse(text: str) -> list | None:
    """The prompt as nodes (text, :class:`_Edit`, :class:`_Alternate`); None when the grammar rejects it."""
    nodes: list = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "[(":
            node, j = _construct(text, i)
            if node is not None:
                nodes.extend(node)
                i = j
                continue
        if c in _STRAY:
            nodes.append(c)
            i += 1
            continue
        m = _PLAIN.match(text, i)
        if m is None:  # a "|" outside any alternation, a backslash at the end or before a newline
            return None
        nodes.append(m.group(0))
        i = m.end()
    return nodes


def _walk(nodes: list):
    for n in nodes:
        if isinstance(n, _Edit):
            yield n
            yield from _walk(n.before or [])
            yield from _walk(n.after)
        elif isinstance(n, _Alternate):
            yield n
            for option in n.options:
                yield from _walk(option)


def _render(nodes: list, step: int, when: dict[int, int]) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif isinstance(n, _Edit):
            out.append(_render(n.before or [], step, when) if step <= when[id(n)] else _render(n.after, step, when))
        else:
            out.append(_render(n.options[(step - 1) % len(n.options)], step, when))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, first_pass: int | None = None) -> list[tuple[int, str]]:
    """A1111's schedule of one prompt over ``steps``: [(until step, text), ...], the last until = steps.

    ``first_pass``: for the hires fix's second pass, the first pass's schedule steps (A1111's ``base_steps``).
    """
    nodes = parse(prompt)
    if nodes is None:
        return [(steps, prompt)]
    int_offset, fraction_offset = (0, 0.0) if first_pass is None else (first_pass, 1.0)
    when: dict[int, int] = {}
    ends = {steps}
    for n in _walk(nodes):
        if isinstance(n, _Alternate):
            ends.update(range(1, steps + 1))
            continue
        v = float(n.number)
        v = (v - fraction_offset) * steps if "." in n.number else v - int_offset
        when[id(n)] = min(steps, int(v))
        if when[id(n)] >= 1:
            ends.add(when[id(n)])
    return [(t, _render(nodes, t, when)) for t in sorted(ends)]


def schedule_steps(steps: int, sampler: str) -> int:
    """The step count a run's prompt schedule is made over: A1111's ``total_steps``, twice the steps for the
    samplers it counts as second order (two model calls a step)."""
    return 2 * steps if sampler in SECOND_ORDER else steps


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class BatchSchedule:
    """The schedules of a batch's items over one table of distinct texts: ``texts`` (each once, in order of first
    use) and, per item, [(until, row in texts)]."""

    texts: list[str]
    rows: list[list[tuple[int, int]]]

    @classmethod
    def of(cls, prompts, steps: int, first_pass: int | None = None) -> BatchSchedule:
        texts: dict[str, int] = {}
        rows = [
            [(until, texts.setdefault(text, len(texts))) for until, text in prompt_schedule(p or "", steps, first_pass)]
            for p in prompts
        ]
        return cls(list(texts), rows)

    @property
    def edited(self) -> bool:
        """Whether any item changes text during the run."""
        return any(len(r) > 1 for r in self.rows)

    def rows_at(self, call: int) -> list[int]:
        """The table row of each item for model call ``call`` (0-based), as A1111's reconstruct_cond_batch."""
        return [next((row for until, row in item if call <= until), item[0][1]) for item in self.rows]


class ScheduledConditioning:
    """The text conditioning of a sampling run that follows prompt schedules: ``cond_table`` / ``uncond_table``
    hold the encoded texts of ``schedule`` / ``negative_schedule`` (dicts of tensors with one row per text:
    context, and SDXL's y), and model call k gets, for each item, the rows that cover k. ``calls`` counts the run's
    model calls so far (the refiner's run continues the base's)."""

    def __init__(self, schedule: BatchSchedule, cond_table: dict, negative_schedule=None, uncond_table=None):
        self.parts = {"cond": (schedule, cond_table)}
        if negative_schedule is not None:
            self.parts["uncond"] = (negative_schedule, uncond_table)
        self.calls = 0
        self._rows: dict = {}

    def at(self, which: str) -> dict:
        """The "cond" or "uncond" text kwargs [B, ...] of the current model call."""
        schedule, table = self.parts[which]
        rows = tuple(schedule.rows_at(self.calls))
        if self._rows.get(which, (None,))[0] != rows:  # gathered once per change of rows
            index = torch.tensor(rows, device=next(iter(table.values())).device)
            self._rows[which] = (rows, {k: v.index_select(0, index) for k, v in table.items()})
        return self._rows[which][1]

    def wrap(self, model):
        """``model`` (a guided denoiser: ``model(x, sigma, cond=, uncond=, cond_scale=)``, and ``with_uncond`` if it
        has one, as denoiser.CFGDenoiser) with each call's text kwargs swapped in; other kwargs (concat) kept."""
        return _Scheduled(model, self)


class _Scheduled:
    def __init__(self, model, conditioning: ScheduledConditioning):
        self.model, self.conditioning = model, conditioning
        if hasattr(model, "with_uncond"):
            self.with_uncond = lambda x, sigma, **kw: self._call(model.with_uncond, x, sigma, kw)

    def _call(self, fn, x, sigma, kw):
        c = self.conditioning
        for which in c.parts:
            if kw.get(which) is not None:
                kw[which] = {**kw[which], **c.at(which)}
        c.calls += 1
        return fn(x, sigma, **kw)

    def __call__(self, x, sigma, **kw):
        return self._call(self.model, x, sigma, kw)

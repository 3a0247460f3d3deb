"""Speculative decoding inside the continuous batch (issue 20).

A model may be paired with a draft model (another loaded model with the same tokenizer). A
request that asks for k > 0 draft tokens carries a `SpeculativeRow` as its sampler; the batch's
`SpeculativeGenerationBatch` keeps a second set of batched KV caches, the draft's, for those
rows, and while any row speculates each step is:

1. the draft proposes k tokens for every speculative row, batched: one pass over each row's
   last two tokens (the last one already in the target's cache, and the pending one), then
   k - 1 passes of one token;
2. the target verifies every row in one forward pass of width k + 1: each row feeds its pending
   token then its proposals (a row that does not speculate feeds its pending token and k
   tokens of padding, ignored). Position 0 is processed exactly as an ordinary step (logits
   processors, samplers, structured-output masks), so non-speculative rows get the token they
   would have got;
3. each speculative row accepts its own prefix: a greedy row the proposals the target's argmax
   agrees with, then the argmax after them; a sampled row each proposal d with probability
   min(1, p(d) / q(d)) (p the target's distribution under the row's settings, q the draft's,
   which d was drawn from), then a token drawn from (p - q)+ where one is refused, or from p
   after the last (`SampledRows`): the standard rule, so its tokens follow the target's
   distribution. A row emits 1 to k + 1 tokens a step;
4. every row is left with k - accepted entries of garbage at the end of both KV caches: the
   shared end index drops the fewest, and the rest are rolled into each row's left padding,
   which is what the caches' `prepare(right_padding=...)` / `finalize()` do for right-padded
   prefill (`roll_back`).

Invariants between steps (for a row with a draft cache): the target's cache holds the row's
`tokens`, its next token is pending (`_next_tokens`, not in any cache), and the draft's cache
holds `tokens[:-1]`. A row joins with its draft cache prefilled from its prompt.

Greedy rows never change what they return (up to the rounding of a (B, k + 1) forward pass
against a (B, 1) one: tests/engine/test_speculative.py checks token identity). A sampled row's
random numbers come from its own key and its own count of speculative steps, so it gives the
same tokens whatever shares its batch, though not the same tokens as without speculation (the
same distribution). Rows with logits processors, penalties, logit bias or a constraint do not
speculate; they decode as before inside the same batch. A row whose proposals are accepted
less than MIN_ACCEPTANCE of the time stops speculating (after PROBE_STEPS steps). With no
speculating row in the batch the step is `FusedGenerationBatch`'s, untouched.
"""

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import _extend_cache, _merge_caches

from .batch_cache import HostKVCache, make_cache
from .errors import DraftIncompatible
from .fused_batch import FusedGenerationBatch, FusedRow
from .fused_sample import _random24
from .models import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS

# A row whose draft tokens the model accepts less often than this, over its first
# PROBE_STEPS speculative steps or any time after, stops speculating: drafting and verifying
# would cost it more than they save (its draft cache row is dropped; it decodes as usual). A
# step that keeps a share r of k proposals makes 1 + r k tokens; on a GPU, where a step is
# bound by the host, it costs about 1 + k d ordinary steps for a draft d times the model's
# step (d ~ 0.2 for a one-layer draft of a 16-layer model): with k = 4, r ~ 0.2 breaks even.
MIN_ACCEPTANCE = 0.25
PROBE_STEPS = 3
# While the draft's recent acceptance is under MIN_ACCEPTANCE, one joining row in this many
# speculates (probes), times one for every PROBE_BATCH rows of the batch it joins: a probing
# row turns the whole batch's step into a speculative one (k draft passes, a (B, k + 1) verify),
# so its cost grows with the batch. The others decode as usual from the start.
REPROBE_EVERY = 8
PROBE_BATCH = 8
# Tokens per pass of the draft's prefill when rows join.
DRAFT_PREFILL_STEP = 512


@dataclass(eq=False)
class Draft:
    """A model's draft model, as the batch uses it. `active` drops when the pair is dissolved
    (either model unloaded): its rows then finish without speculation."""

    model_id: str
    model: nn.Module
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    active: bool = True
    # The share of proposals accepted lately, every row together (None: none made yet), and
    # the rows that joined while it was under MIN_ACCEPTANCE (see `probes`).
    acceptance: float | None = None
    joined_while_poor: int = 0

    def note(self, proposed: int, accepted: int) -> None:
        if proposed:
            rate = accepted / proposed
            previous = self.acceptance
            self.acceptance = rate if previous is None else previous + 0.1 * (rate - previous)

    def probes(self, batch_rows: int) -> bool:
        """Whether a greedy row joining a batch of `batch_rows` speculates: always while the
        draft is right often enough, else one row in REPROBE_EVERY per PROBE_BATCH rows (a
        workload the draft suits again is found again), so that a draft of no use costs new
        rows, and the batch they join, few probing steps."""
        if self.acceptance is None or self.acceptance >= MIN_ACCEPTANCE:
            return True
        self.joined_while_poor += 1
        every = REPROBE_EVERY * max(1, batch_rows // PROBE_BATCH)
        return self.joined_while_poor % every == 0


class SpeculativeRow:
    """The sampler of a row that speculates, with the row's draft, its k and its counts of
    proposed and accepted draft tokens: greedy (argmax), or sampled with `fused` (its settings
    and seeded key; as a sampler on its own, in steps that do not speculate, it is that)."""

    def __init__(self, draft: Draft, draft_tokens: int, fused: FusedRow | None = None):
        self.draft = draft
        self.draft_tokens = draft_tokens
        self.fused = fused
        self.proposed = 0
        self.accepted = 0
        self.steps = 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.fused is not None:
            return self.fused(logprobs)
        return mx.argmax(logprobs, axis=-1)


def speculative_row(
    draft: Draft | None,
    requested: int | None,
    greedy: bool,
    sampler: Any,
    processors: list,
    constrained: bool,
) -> SpeculativeRow | None:
    """The row's SpeculativeRow, or None where it decodes without speculation: no draft, k 0
    (the request's, or the pairing's when the request leaves it unset), or a row whose logits
    processors, constraint, penalties or logit bias must see every step on its own. A sampled
    row speculates with its fused sampler's settings and key (speculative sampling)."""
    if draft is None or not draft.active:
        return None
    k = draft.draft_tokens if requested is None else requested
    if k <= 0 or processors or constrained:
        return None
    if greedy and sampler is None:
        return SpeculativeRow(draft, min(k, MAX_DRAFT_TOKENS))
    if (
        isinstance(sampler, FusedRow)
        and not sampler.penalized
        and not sampler.params.logit_bias
        and sampler.params.repetition_penalty == 1.0
    ):
        return SpeculativeRow(draft, min(k, MAX_DRAFT_TOKENS), sampler)
    return None


def check_pairing(target, draft) -> None:
    """Raise DraftIncompatible unless `draft` (a LoadedModel) can draft for `target`: the same
    vocabulary and special tokens, and caches speculation can roll back (plain KV caches)."""
    problems = []
    if target.info.vocab_size != draft.info.vocab_size:
        problems.append(
            f"vocabulary sizes differ ({target.info.vocab_size} and {draft.info.vocab_size})"
        )
    t, d = target.tokenizer, draft.tokenizer
    if t.get_vocab() != d.get_vocab():
        problems.append("the tokenizers' vocabularies differ")
    if sorted(t.eos_token_ids) != sorted(d.eos_token_ids) or t.bos_token_id != d.bos_token_id:
        problems.append("the special tokens (BOS, EOS) differ")
    if sorted(t.all_special_ids) != sorted(d.all_special_ids):
        problems.append("the special tokens differ")
    for name, loaded in (("the model", target), ("the draft model", draft)):
        if not all(type(c) is HostKVCache for c in make_cache(loaded.model)):
            problems.append(f"{name}'s KV cache cannot be rolled back (not a plain KV cache)")
    if problems:
        raise DraftIncompatible(
            f"{draft.info.model_id!r} cannot draft for {target.info.model_id!r}: "
            + "; ".join(problems),
            target.info.model_id,
        )


def roll_back(caches: list, garbage: Seq[int]) -> None:
    """Drop each row's last `garbage[i]` entries: the shared end index loses the fewest, and
    the rest become left padding (rolled to the front, as after right-padded prefill)."""
    shared = min(garbage)
    rest = [g - shared for g in garbage]
    for c in caches:
        if shared:
            c.trim(shared)
        if max(rest) > 0:
            c.prepare(right_padding=rest)
            c.finalize()


# Salts of a sampled row's three streams of random numbers (its key, hashed with a counter as
# fused_sample draws): the draft's proposals, the acceptance tests, the token after them.
DRAFT_SALT, ACCEPT_SALT, FINAL_SALT = 0x5BD1E995, 0x27D4EB2F, 0x165667B1


class SampledRows:
    """The sampled rows among a step's speculating rows (greedy ones ride along, unused): their
    settings as device arrays, and their seeded random numbers. Each row's numbers come from its
    own key and its own count of speculative steps, never from the batch: a seeded request gives
    the same tokens whatever else runs beside it."""

    def __init__(self, rows: list[SpeculativeRow], k: int):
        self.rows = rows
        self.k = k
        fused = [row.fused for row in rows]
        self.any = any(f is not None for f in fused)
        if not self.any:
            return
        params = [f.params if f is not None else None for f in fused]
        self.mask = mx.array([f is not None for f in fused])
        self.temperature = mx.array([p.temperature if p else 1.0 for p in params], mx.float32)
        self.top_k = mx.array([p.top_k if p else 0 for p in params], mx.int32)
        self.top_p = mx.array([p.top_p if p else 1.0 for p in params], mx.float32)
        self.min_p = mx.array([p.min_p if p else 0.0 for p in params], mx.float32)
        self.keys = [f.key if f is not None else 0 for f in fused]

    def __bool__(self) -> bool:
        return self.any

    def uniforms(self, salt: int, index: int) -> mx.array:
        """One number in [0, 1) per row: the row's `index`-th of stream `salt` this step."""
        pairs = [
            ((key ^ salt) & 0xFFFFFFFF, (row.steps * (MAX_DRAFT_TOKENS + 1) + index) & 0xFFFFFFFF)
            for key, row in zip(self.keys, self.rows, strict=True)
        ]
        keys = mx.array(pairs, mx.uint32)
        return _random24(keys).astype(mx.float32) * 2.0**-24

    def probabilities(self, logprobs: mx.array) -> mx.array:
        """What fused_sample draws from, per row (its filters and temperature, normalized);
        logprobs (R, V) or (R, P, V), R the rows."""
        shape = logprobs.shape
        if len(shape) == 3:
            flat = logprobs.reshape(-1, shape[-1])
            repeat = shape[1]
        else:
            flat, repeat = logprobs, 1

        def per_row(a: mx.array) -> mx.array:
            return mx.repeat(a, repeat) if repeat > 1 else a

        probs = filtered(
            flat,
            per_row(self.temperature),
            per_row(self.top_k),
            per_row(self.top_p),
            per_row(self.min_p),
        )
        return probs.reshape(shape)

    def verify(self, logprobs: mx.array, draft_probs: mx.array, drafted: mx.array) -> tuple:
        """For each row and position: whether the proposal passes the acceptance test, the token
        drawn from the residual (p - q)+ there, and the token drawn from p there (the bonus
        after every proposal passed). logprobs (R, k + 1, V), draft_probs (R, k, V)."""
        p = self.probabilities(logprobs)
        k = self.k
        picked = drafted[..., None].astype(mx.int32)
        p_d = mx.take_along_axis(p[:, :k], picked, axis=-1)[..., 0]
        q_d = mx.take_along_axis(draft_probs, picked, axis=-1)[..., 0]
        u = mx.stack([self.uniforms(ACCEPT_SALT, j) for j in range(k)], axis=1)
        accept = u * q_d < p_d
        final = self.uniforms(FINAL_SALT, 0)
        residual = mx.maximum(p[:, :k] - draft_probs, 0.0)
        rows = p.shape[0]
        residual_tokens = draw(residual.reshape(rows * k, -1), mx.repeat(final, k)).reshape(rows, k)
        bonus_tokens = draw(p.reshape(rows * (k + 1), -1), mx.repeat(final, k + 1)).reshape(
            rows, k + 1
        )
        return accept, residual_tokens, bonus_tokens


def filtered(
    logprobs: mx.array,
    temperature: mx.array,
    top_k: mx.array,
    top_p: mx.array,
    min_p: mx.array,
) -> mx.array:
    """The distribution fused_sample samples a row from (native/README.md steps 4-6, without
    bias, penalties or a mask), normalized: min-p, top-k and top-p thresholds on p relative to
    the largest, then the kept tokens' exp((x - max) / temperature)."""
    x = logprobs.astype(mx.float32)
    V = x.shape[-1]
    m = mx.max(x, axis=-1, keepdims=True)
    p = mx.exp(x - m)
    descending = mx.sort(p, axis=-1)[:, ::-1]
    want_k = (top_k > 0) & (top_k < V)
    t_k = mx.take_along_axis(descending, mx.clip(top_k - 1, 0, V - 1)[:, None], axis=-1)[:, 0]
    t = mx.where(want_k, t_k, 0.0)
    sums = mx.cumsum(descending, axis=-1)
    target = sums[:, -1] * top_p
    first = mx.sum(sums < target[:, None], axis=-1)
    t_p = mx.take_along_axis(descending, mx.minimum(first, V - 1)[:, None], axis=-1)[:, 0]
    t = mx.maximum(t, mx.where(top_p < 1, t_p, 0.0))
    t = mx.minimum(mx.maximum(t, mx.where(min_p > 0, min_p, 0.0)), 1.0)
    kept = (p > 0) & (p >= t[:, None])
    w = mx.where(kept, mx.exp((x - m) / temperature[:, None]), 0.0)
    return w / mx.sum(w, axis=-1, keepdims=True)


def draw(weights: mx.array, u: mx.array) -> mx.array:
    """One token per row of non-negative `weights` (R, V) at the point `u` (R,) of their
    running sum; a row of zeros gives its largest id."""
    running = mx.cumsum(weights, axis=-1)
    point = u * running[:, -1]
    index = mx.sum(running <= point[:, None], axis=-1)
    last = weights.shape[-1] - 1 - mx.argmax(weights[:, ::-1] > 0, axis=-1)
    return mx.minimum(index, last).astype(mx.uint32)


class SpeculativeGenerationBatch(FusedGenerationBatch):
    """FusedGenerationBatch whose rows with a SpeculativeRow speculate with their draft."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._draft: Draft | None = None
        self._draft_cache: list = []
        # Per row: whether it has a row in the draft's caches (those rows, in batch order);
        # whether it will, once it has its first token (see `extend`).
        self._drafted: list[bool] = []
        self._waiting: list[bool] = []
        super().__init__(*args, **kwargs)
        self._drafted = [False] * len(self.uids)
        self._waiting = [False] * len(self.uids)

    # ---- rows joining and leaving -----------------------------------------------------

    def extend(self, batch):
        """Rows join. One that speculates gets its draft cache at its first speculative step,
        after its first token: that token comes from an ordinary step, as fast as ever."""
        first = len(self.uids)
        super().extend(batch)
        added = len(self.uids) - first
        self._drafted.extend([False] * added)
        self._waiting.extend([False] * added)
        self._dissolve_if_inactive()
        for i in range(first, len(self.uids)):
            row = self.samplers[i] if self.samplers else None
            if not isinstance(row, SpeculativeRow):
                continue
            draft = row.draft
            # A seeded sampled row always probes: whether it speculates changes its draws, and
            # they must not depend on what ran before it.
            probes = row.fused is not None or draft.probes(len(self.uids))
            if not draft.active or self._draft not in (None, draft) or not probes:
                self._plain_sampler(i)
                continue
            self._draft = draft
            self._waiting[i] = True

    def _prefill_draft(self, rows: list[int]) -> None:
        """The draft's caches of rows starting to speculate, every token of each row but its
        last: one right-padded batch, as mlx-lm prefills prompts (the padding rolled into left
        padding); then the draft cache's rows are put in batch order again."""
        draft = self._draft
        assert draft is not None
        tokens = [self.tokens[i][:-1] for i in rows]
        cache = _merge_caches([make_cache(draft.model) for _ in rows])
        longest = max(map(len, tokens))
        if longest:
            padding = [longest - len(t) for t in tokens]
            padded = mx.array([t + [0] * p for t, p in zip(tokens, padding, strict=True)])
            if max(padding):
                for c in cache:
                    c.prepare(lengths=[len(t) for t in tokens], right_padding=padding)
            for start in range(0, longest, DRAFT_PREFILL_STEP):
                draft.model(padded[:, start : start + DRAFT_PREFILL_STEP], cache=cache)
                mx.eval([c.state for c in cache])
            if max(padding):
                for c in cache:
                    c.finalize()
        before = [i for i, d in enumerate(self._drafted) if d]
        self._draft_cache = _extend_cache(self._draft_cache, cache)
        for i in rows:
            self._drafted[i] = True
            self._waiting[i] = False
        appended = before + rows
        order = sorted(range(len(appended)), key=appended.__getitem__)
        if order != list(range(len(appended))):
            for c in self._draft_cache:
                c.filter(order)

    def filter(self, keep):
        drafted, waiting = self._drafted, self._waiting
        super().filter(keep)
        self._drafted = [drafted[i] for i in keep]
        self._waiting = [waiting[i] for i in keep]
        if self._draft is None:
            return
        if any(drafted):
            position, positions = 0, {}
            for i, d in enumerate(drafted):
                if d:
                    positions[i] = position
                    position += 1
            kept = [positions[i] for i in keep if drafted[i]]
            if not kept:
                self._draft_cache = []
            elif len(kept) < position:
                for c in self._draft_cache:
                    c.filter(kept)
        if not any(self._drafted) and not any(self._waiting):
            self._drop_draft()

    def _drop_draft(self) -> None:
        for i, (drafted, waiting) in enumerate(zip(self._drafted, self._waiting, strict=True)):
            if drafted or waiting:
                self._plain_sampler(i)
        self._draft, self._draft_cache = None, []
        self._drafted = [False] * len(self.uids)
        self._waiting = [False] * len(self.uids)

    def _plain_sampler(self, i: int) -> None:
        """Row i no longer speculates: it samples as any row (greedy ones in the batch's one
        argmax, fused ones in its fused call). Its SpeculativeRow keeps its counts."""
        if self.samplers and isinstance(row := self.samplers[i], SpeculativeRow):
            self.samplers[i] = row.fused if row.fused is not None else self.fallback_sampler

    def _dissolve_if_inactive(self) -> None:
        if self._draft is not None and not self._draft.active:
            self._drop_draft()

    # ---- a step -----------------------------------------------------------------------

    def next(self):
        if self._draft is None or not self.uids:
            return super().next()
        self._dissolve_if_inactive()
        if self._draft is None:
            return super().next()
        # Rows with their first token, and another to come after this step's.
        starting = [
            i
            for i, w in enumerate(self._waiting)
            if w and 0 < self._num_tokens[i] < self.max_tokens[i] - 1
        ]
        if starting:
            self._prefill_draft(starting)
        rows = [i for i, d in enumerate(self._drafted) if d]
        ks = []
        for i in rows:
            row = self.samplers[i]
            remaining = self.max_tokens[i] - self._num_tokens[i] - 1
            ks.append(max(0, min(row.draft_tokens, remaining)))
        if not rows or max(ks) == 0:
            # No row speculates this step (or every one that does ends with its pending token,
            # max_tokens, after which it leaves): an ordinary step. Rows waiting for their draft
            # cache get it after their first token, computed here.
            return super().next()
        return self._speculate(rows, ks, max(ks))

    def _speculate(self, rows: list[int], ks: list[int], k: int) -> list:
        draft = self._draft
        assert draft is not None
        n = len(self.uids)
        pending = self._next_tokens.astype(mx.uint32)
        pending_logprobs = self._next_logprobs
        every = len(rows) == n
        index = None if every else mx.array(rows)

        samplers: list[Any] = self.samplers or []
        sampled = SampledRows([samplers[i] for i in rows], k)
        # 1. The draft's proposals, k per speculating row (sampled rows draw from the draft's
        # distribution under their own settings: `draft_probs`).
        last = mx.array([self.tokens[i][-1] for i in rows], mx.uint32)
        ahead = pending if every else pending[index]
        inputs = mx.stack([last, ahead], axis=1)
        proposals, draft_probs = [], []
        for j in range(k):
            logits = draft.model(inputs, cache=self._draft_cache)[:, -1, :]
            token = mx.argmax(logits, axis=-1).astype(mx.uint32)
            if sampled:
                q = sampled.probabilities(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
                draft_probs.append(q)
                token = mx.where(sampled.mask, draw(q, sampled.uniforms(DRAFT_SALT, j)), token)
            proposals.append(token)
            inputs = token[:, None]
        drafted = mx.stack(proposals, axis=1)

        # 2. The target's verify pass over every row: its pending token, then the proposals.
        if every:
            proposed = drafted
        else:
            proposed = mx.zeros((n, k), mx.uint32)
            proposed[index] = drafted
        verify = mx.concatenate([pending[:, None], proposed], axis=1)
        logits = self.model(verify, cache=self.prompt_cache)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        # Position 0 is an ordinary step for every row (processors, samplers, masks).
        targets = mx.argmax(logprobs if every else logprobs[index], axis=-1)
        if every and not any(self.logits_processors or ()):
            first = targets[:, 0]
        else:
            # The speculating rows' tokens here are not used: they take the batch's one
            # argmax (their fused samplers' draw counters stay as they were, so that they draw
            # alike whatever shares the batch).
            kept, plain = self.samplers or [], list(self.samplers or [])
            for i in rows:
                plain[i] = self.fallback_sampler
            self.samplers = plain
            try:
                first = self._first_tokens(logits[:, 0, :], logprobs[:, 0, :], pending)
            finally:
                self.samplers = kept
        verdicts = None
        if sampled:
            verdicts = sampled.verify(
                logprobs if every else logprobs[index], mx.stack(draft_probs, axis=1), drafted
            )
        mx.eval(first, drafted, targets, pending, verdicts)

        # 3. Acceptance.
        firsts = cast(list[int], first.tolist())
        drafted_list = cast(list[list[int]], drafted.tolist())
        target_list = cast(list[list[int]], targets.tolist())
        pending_list = cast(list[int], pending.tolist())
        accepted = [0] * n
        following = list(firsts)
        proposals_of: dict[int, list[int]] = {}
        giving_up: list[int] = []
        if verdicts is not None:
            accepts, residuals, bonuses = (cast(list[list[Any]], v.tolist()) for v in verdicts)
        for j, (i, ki) in enumerate(zip(rows, ks, strict=True)):
            proposals_of[i] = drafted_list[j]
            row = samplers[i]
            a = 0
            if row.fused is None:  # greedy: the target's argmax agrees
                while a < ki and drafted_list[j][a] == target_list[j][a]:
                    a += 1
                following[i] = target_list[j][a]
            else:  # sampled: accepted with probability min(1, p / q), else from (p - q)+
                while a < ki and accepts[j][a]:
                    a += 1
                following[i] = residuals[j][a] if a < ki else bonuses[j][a]
            accepted[i] = a
            row.proposed += ki
            row.accepted += a
            row.steps += 1
            if row.steps >= PROBE_STEPS and row.accepted < MIN_ACCEPTANCE * row.proposed:
                giving_up.append(i)
        draft.note(sum(ks), sum(accepted[i] for i in rows))

        # 4. Both caches lose what was not accepted.
        roll_back(self.prompt_cache, [k - a for a in accepted])
        roll_back(self._draft_cache, [k - accepted[i] for i in rows])

        emitted: list[list[int]] = []
        emitted_logprobs: list[list[mx.array]] = []
        for i in range(n):
            a = accepted[i]
            tokens = [pending_list[i], *(proposals_of[i][:a] if a else ())]
            emitted.append(tokens)
            emitted_logprobs.append([pending_logprobs[i], *(logprobs[i, j] for j in range(a))])
            self.tokens[i].extend(tokens)
        self._current_tokens = cast(Any, pending)
        self._current_logprobs = pending_logprobs
        self._next_tokens = mx.array(following, mx.uint32)
        self._next_logprobs = [logprobs[i, accepted[i]] for i in range(n)]
        if giving_up:
            self._undraft(giving_up)
        return self._responses(emitted, emitted_logprobs)

    def _undraft(self, stopping: list[int]) -> None:
        """These rows stop speculating: their rows of the draft's caches go."""
        drafted = [i for i, d in enumerate(self._drafted) if d]
        keep = [j for j, i in enumerate(drafted) if i not in stopping]
        for i in stopping:
            self._drafted[i] = False
            self._plain_sampler(i)
        if not keep:
            self._draft_cache = []
            if not any(self._waiting):
                self._draft = None
        else:
            for c in self._draft_cache:
                c.filter(keep)

    def _first_tokens(self, logits: mx.array, logprobs: mx.array, inputs: mx.array) -> mx.array:
        """Position 0 of the verify pass as FusedGenerationBatch._step samples it."""
        every: list[Any] = self.logits_processors or []
        if any(every):
            processed = []
            for e in range(len(self.uids)):
                row_logits = logits[e : e + 1]
                processors = every[e] or ()
                if processors:
                    context = self._token_context[e].update_and_fetch(inputs[e : e + 1])
                    for processor in processors:
                        row_logits = processor(context, row_logits)
                processed.append(row_logits)
            logits = mx.concatenate(processed, axis=0)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self._sample(logprobs, inputs).astype(mx.uint32)

    def _responses(self, emitted: list[list[int]], logprobs: list[list[mx.array]]) -> list:
        """GenerationBatch.next's responses, one per emitted token; a row that ends (length,
        stop token) ends at that token, and its later accepted tokens are dropped."""
        keep, responses = [], []
        for i in range(len(self.uids)):
            tokens = emitted[i]
            finished = False
            for j, token in enumerate(tokens):
                reason = None
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    reason = "length"
                if self._matchers[i].advance(token):
                    reason = "stop"
                if reason is None:
                    responses.append(
                        self.Response(self.uids[i], token, logprobs[i][j], None, None, None)
                    )
                    continue
                extra = len(tokens) - j - 1
                cache = self.extract_cache(i)
                all_tokens = self.tokens[i]
                if extra:
                    for c in cache:
                        c.trim(extra)
                    all_tokens = all_tokens[:-extra]
                responses.append(
                    self.Response(self.uids[i], token, logprobs[i][j], reason, cache, all_tokens)
                )
                finished = True
                break
            if not finished:
                keep.append(i)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses

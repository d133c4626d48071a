"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget. Running sequences go first, oldest first: a decoding sequence needs one
token, a sequence still prefilling needs the rest of its prompt (chunked to what the budget leaves). Then
waiting sequences join while budget, sequence slots and KV blocks last. When a running sequence cannot
get a block, the newest running sequence is preempted: its blocks are freed and it goes back to the front
of the queue, to be recomputed later (mostly from the prefix cache). Nothing is dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from phi4.engine.kv_cache import BlockManager
from phi4.engine.request import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so its logits give the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        cache_salt: Callable[[Sequence], object] = lambda seq: None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cache_salt = cache_salt
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = self._fit(seq, budget)
            while num_new == 0:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
                num_new = self._fit(seq, budget)
            else:
                self.block_manager.reserve(seq, num_new)
                scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
                index += 1
        # Admitting new work right after a preemption would only thrash the cache.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table and not seq.needs_prompt_logprobs:  # those are computed, not cached
                self.block_manager.match_prefix(seq, self.cache_salt(seq))
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            num_new = self._fit(seq, budget)
            if num_new == 0:
                self._release(seq)
                break
            self.block_manager.reserve(seq, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return scheduled

    def _fit(self, seq: Sequence, budget: int) -> int:
        """How many of the sequence's uncomputed tokens fit in the budget and in its blocks plus free ones."""
        manager = self.block_manager
        capacity = (len(seq.block_table) + manager.num_free_blocks) * manager.block_size - seq.num_computed_tokens
        return max(0, min(seq.num_tokens - seq.num_computed_tokens, budget, capacity))

    def finish_step(self, scheduled: list[ScheduledSequence]) -> None:
        """Account for the computed tokens and cache the blocks they filled."""
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit(item.seq, self.cache_salt(item.seq))

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0

"""llama.cpp as an optional arm of cpu_roofline.py: the same checkpoint, converted by llama.cpp's own
converter to a bfloat16 GGUF, decoded through llama-cpp-python's low-level API with the same threads.

Neither is a phi4 dependency. To run the arm:
    pip install llama-cpp-python            # builds llama.cpp from source (5.5 min on 2 cores here)
    pip download llama-cpp-python --no-binary :all: --no-deps && tar xzf llama_cpp_python-*.tar.gz
    python benchmarks/cpu_roofline.py --llama-cpp llama_cpp_python-*/vendor/llama.cpp
(any llama.cpp checkout with convert_hf_to_gguf.py and gguf-py/ will do as the source).

A step here is what a phi4 step is: one `llama_decode` of one new token for each running sequence, then
the greedy choice over the vocabulary for each (numpy's argmax over the logits llama.cpp returns).
"""

from __future__ import annotations

import ctypes
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def convert_to_gguf(checkpoint: Path, llama_cpp_source: Path, out: Path) -> Path:
    """llama.cpp's converter on a Hugging Face checkpoint directory, weights kept in bfloat16."""
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_source / "gguf-py"))
    result = subprocess.run([sys.executable, str(llama_cpp_source / "convert_hf_to_gguf.py"), str(checkpoint),
                             "--outtype", "bf16", "--outfile", str(out)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{result.stderr[-3000:]}")
    return out


class LlamaCppDecoder:
    """A llama.cpp model and context able to run `max_sequences` sequences at once."""

    def __init__(self, gguf: Path, threads: int, max_sequences: int = 16, context: int = 8192) -> None:
        import llama_cpp

        self.api = llama_cpp
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # kept: C holds it
        llama_cpp.llama_log_set(self._quiet, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = context, 512, 512
        params.n_seq_max, params.n_threads, params.n_threads_batch = max_sequences, threads, threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(512, 0, max_sequences)

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, (token, position, sequence, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, logits
        if self.api.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _greedy(self, rows: int) -> list[int]:
        pointer = self.api.llama_get_logits(self.ctx)
        logits = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(rows, self.vocab))
        return logits.argmax(axis=1).tolist()

    def step_ms(self, sequences: int, prompt_len: int, steps: int) -> float:
        """Median time of a decode step with `sequences` running (prompts prefilled beforehand)."""
        self.api.llama_memory_clear(self.api.llama_get_memory(self.ctx), True)
        rng = random.Random(sequences)
        last = []
        for sequence in range(sequences):
            prompt = [rng.randrange(100, 100_000) for _ in range(prompt_len)]
            for first in range(0, prompt_len, 512):
                chunk = prompt[first : first + 512]
                self._decode([(token, first + i, sequence, first + i == prompt_len - 1)
                              for i, token in enumerate(chunk)])
            last.append(self._greedy(1)[0])
        times = []
        for step in range(steps):
            start = time.perf_counter()
            self._decode([(token, prompt_len + step, sequence, True) for sequence, token in enumerate(last)])
            last = self._greedy(sequences)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

"""Scheduling limits."""

from dataclasses import dataclass


@dataclass
class SchedulerConfig:
    max_model_len: int | None = None  # context window (prompt plus output); None: the model's own, set by the engine
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0: no cap; else max prefill tokens of one request per step
    max_waiting_requests: int | None = None  # only reported by is_queue_full(); the server turns it into 503

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(
                f"max_model_len must be >= 2 (one prompt and one generated token), got {self.max_model_len}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be None or >= 1, got {self.max_waiting_requests}")
        if not self.enable_chunked_prefill:
            # Without chunking a whole sequence (a preempted one included) must fit one step, or it waits forever.
            if self.max_model_len is not None and self.max_num_batched_tokens < self.max_model_len:
                raise ValueError(
                    f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                    f"({self.max_model_len}) when enable_chunked_prefill is False"
                )
            if self.long_prefill_token_threshold:
                raise ValueError("long_prefill_token_threshold requires enable_chunked_prefill")

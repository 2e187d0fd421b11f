"""A local transformers causal LM as judge (Hub id or local folder), greedy, with the pinned prompt.

The model loads in ``prepare()`` (before the run streams, so a bad path is a configuration error) and
answers each judgment with greedy decoding of at most ``max_tokens`` tokens. The chat template of the
tokenizer is used when it has one; otherwise the messages are laid out as plain text.
"""

from __future__ import annotations

from typing import Any

from mukv.errors import ConfigError
from mukv.judge.cache import JudgmentCache
from mukv.judge.llm import JudgeRequestError, LLMJudge


class HFJudge(LLMJudge):
    name = "hf"

    def __init__(self, model: str, prompt_version: str, *, device: str = "auto", dtype: str = "auto",
                 max_tokens: int = 64, cache: JudgmentCache | None = None,
                 max_consecutive_failures: int | None = 10) -> None:
        super().__init__(model, prompt_version, cache, max_consecutive_failures)
        self.device_name, self.dtype_name, self.max_tokens = device, dtype, max_tokens
        self.lm: Any = None
        self.tokenizer: Any = None

    @classmethod
    def from_config(cls, cfg) -> HFJudge:
        return cls(cfg.model, cfg.prompt_version, device=cfg.device, dtype=cfg.dtype, max_tokens=cfg.max_tokens,
                   cache=cls.cache_of(cfg), max_consecutive_failures=cfg.max_consecutive_failures)

    def prepare(self) -> None:
        if self.lm is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mukv.models.loading import _from_pretrained

        device = self.device_name
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype_name
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        try:  # as model.path loads: a folder as is, a Hub id from the cache alone when the Hub cannot be reached
            self.tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, self.model, "judge's tokenizer",
                                              field="judge.model")
            self.lm = _from_pretrained(AutoModelForCausalLM.from_pretrained, self.model, "judge model",
                                       field="judge.model", dtype=getattr(torch, dtype)).to(device)
        except (OSError, ValueError) as err:
            raise ConfigError("judge.model", f"cannot load the judge model '{self.model}': {err}") from err
        self.lm.eval()

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
        return tok(text)["input_ids"]

    def complete(self, messages: list[dict[str, str]]) -> str:
        import torch

        self.prepare()
        try:
            ids = torch.tensor([self._prompt_ids(messages)], device=self.lm.device)
            with torch.inference_mode():
                out = self.lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=self.max_tokens,
                                       pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        except (RuntimeError, ValueError) as err:  # e.g. out of memory, a prompt longer than the context
            raise JudgeRequestError(f"generation failed: {err}") from err
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def close(self) -> None:
        super().close()
        self.lm = None

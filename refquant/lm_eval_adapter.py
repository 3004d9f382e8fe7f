"""lm-evaluation-harness 0.4 model ``refquant``: any lm-eval log-likelihood task on refquant's evaluator.

    python -m refquant.lm_eval_adapter run --model refquant --model_args pretrained=DIR,dtype=bfloat16 \\
        --tasks piqa,arc_easy --device cuda

(this module registers the model with ``lm_eval.api.registry.register_model("refquant")`` when it is
imported, then hands the command line to lm-eval's own CLI; in Python, ``import
refquant.lm_eval_adapter`` and pass ``model="refquant"`` or a :class:`RefquantLM` to
``lm_eval.simple_evaluate``).

Requests are scored the way :mod:`refquant.evaluate` scores the study's tasks, i.e. the v0.3.0
protocol: context and continuation tokenized *separately* without special tokens (``bos=True``:
the BOS id before the context), an empty context becomes the EOS id, left truncation to
``max_length + 1`` tokens, float32 log-softmax; the requests of one document share their common
prefix in one row (:func:`refquant.evaluate.score_fast`; ``fast=False``: the batch-1 reference).
lm-eval 0.4's own ``hf`` model instead encodes ``context + continuation`` jointly and splits it
(``TemplateLM._encode_pair``) and adds BOS by the tokenizer's default; ``docs/evaluation.md``
lists where that changes the tokens. A checkpoint written by ``refquant quantize`` carries its
activation quantizers in ``refquant.json``; they are applied as ``refquant eval`` does.
Generation tasks (``generate_until``) are not supported: refquant's evaluator scores log-likelihoods.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import sys

import torch
from lm_eval import utils as lm_utils
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from . import evaluate as ev
from .torch_pipeline import act_quant_applied, load_model

log = logging.getLogger("refquant")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _flag(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean model argument, got {value!r}.")
        return value.lower() in ("true", "1", "yes")
    return bool(value)


@register_model("refquant")
class RefquantLM(TemplateLM):
    """A refquant checkpoint (or any Hugging Face LLaMA directory) for lm-eval 0.4.

    Model arguments: ``pretrained`` (directory; default the embedded tiny model), ``dtype``
    (float32 | bfloat16 | float16), ``device`` (default cuda if available), ``bos`` (False: the
    study's no-BOS protocol), ``fast`` (True), ``token_budget``, ``max_length`` (default the model's
    ``max_position_embeddings``, as the study's LMClass), or
    ``model``/``tokenizer`` objects (Python only).
    """

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", device: str | None = None,
                 bos=False, fast=True, token_budget: int | None = None, max_length: int | None = None,
                 model=None, tokenizer=None, batch_size=None, max_batch_size=None, **kwargs):
        super().__init__()
        path = pathlib.Path(pretrained) if pretrained else pathlib.Path(__file__).resolve().parent.parent / \
            "golden" / "models" / "tiny-llama3"
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}.")
        if device in (None, "", "auto") or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device not in (None, "", "auto"):  # lm-eval's CLI passes --device (default cuda)
                log.warning("device %s requested but CUDA is not available; using the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model if model is not None else load_model(str(path), dtype=_DTYPES[dtype], device=device)
        self.model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else ev.load_tokenizer(path)
        self.bos = _flag(bos)
        self.fast = _flag(fast)
        self.token_budget = int(token_budget) if token_budget else None
        self._max_length = int(max_length) if max_length else ev.model_max_length(self.model)
        recipe_file = path / "refquant.json"
        self.recipe = ev.recipe_of(json.loads(recipe_file.read_text()).get("act_quant", {})) \
            if model is None and recipe_file.exists() else {}
        self.unused_args = {k: v for k, v in kwargs.items() if v is not None}

    # ---- lm-eval's interface ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def _score(self, token_requests, groups, disable_tqdm: bool):
        use_fast = self.fast and not ev.batch_dependent(self.recipe)
        with act_quant_applied(self.model, self.recipe) if self.recipe else contextlib.nullcontext():
            if use_fast:
                return ev.score_fast(self.model, token_requests, groups, self.token_budget, desc="refquant",
                                     return_greedy=True)
            return ev.score_batch1(self.model, token_requests, desc="refquant", return_greedy=True)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """v0.3.0 request encoding (:func:`refquant.evaluate.encode_request`); a document's requests share a row."""
        token_requests, by_doc = [], {}
        for i, req in enumerate(requests):
            context, continuation = req.args
            token_requests.append(ev.encode_request(self.tokenizer, context, continuation, bos=self.bos,
                                                    max_length=self.max_length))
            key = (getattr(req, "task_name", None), getattr(req, "doc_id", None), getattr(req, "repeats", None))
            by_doc.setdefault(key if key[1] is not None else ("request", i), []).append(i)
        groups = []
        for g in by_doc.values():
            truncated = any(len(token_requests[j].tokens) > self.max_length for j in g)
            groups += [[j] for j in g] if truncated else [g]
        lls, greedy = self._score(token_requests, groups, disable_tqdm)
        return list(zip(lls, greedy))

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        token_requests = []
        for _, context_enc, continuation_enc in requests:
            token_requests.append(ev.TokenRequest(list(context_enc + continuation_enc)[-(self.max_length + 1):],
                                                  len(continuation_enc)))
        lls, greedy = self._score(token_requests, None, kwargs.get("disable_tqdm", False))
        return list(zip(lls, greedy))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood in disjoint windows of ``max_length`` (v0.3.0 / 0.4 rolling windows,
        the EOS id as the first window's context)."""
        out = []
        for req in requests:
            (string,) = req.args
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.eot_token_id, max_seq_len=self.max_length,
                context_len=1)]
            token_requests = [ev.TokenRequest(list(c) + list(x), len(x)) for c, x in windows]
            lls, _ = self._score(token_requests, None, True)
            out.append(float(sum(lls)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the refquant lm-eval model scores log-likelihoods only (multiple-choice and "
                                  "perplexity tasks); use lm-eval's 'hf' model for generation tasks.")


def main(argv=None) -> None:
    """lm-eval's command line with the ``refquant`` model registered."""
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()

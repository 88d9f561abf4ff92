"""The model side of chat.py and serve.py: load base + LoRA adapter, render a conversation with the model's
own chat template (chat.py drops the oldest turns to fit the context window), stream one answer from a
background thread (`Generation`: the one generation code path of both scripts), and merge the adapter
into a standalone model.
"""

import os
import queue
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from qlora_model import UsageError, load_model, load_model_and_tokenizer, load_tokenizer  # before peft: see its top

# isort: split
from peft import PeftModel
from transformers import AutoConfig, StoppingCriteria, StoppingCriteriaList, set_seed
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

if not sys.stderr.isatty():  # a log file: no "Loading weights" carriage-return bars in it
    hf_logging.disable_progress_bar()


def load_chat_model(base: str, adapter: Path | None, quantization: str, trust_remote_code: bool = False):
    """(model, tokenizer): the base model, wrapped in PeftModel when an adapter is given. The tokenizer
    is the base model's: finetune.py trains with it and only copies it into the adapter dir."""
    model, tokenizer = load_model_and_tokenizer(base, quantization=quantization, trust_remote_code=trust_remote_code)
    if adapter is not None:
        model = attach_adapter(model, adapter, base)
    model.eval()
    return model, tokenizer


def attach_adapter(model, adapter: Path, base: str) -> PeftModel:
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except RuntimeError as e:  # state_dict shape mismatch: the adapter was trained on another architecture/size
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise UsageError(f"adapter {adapter} does not fit base model {base} ({first}); pass the base model "
                         f"it was trained on with --model_name_or_path") from e


def end_of_turn_ids(tokenizer, model) -> list[int]:
    """Token ids that end an answer: the chat template's end-of-turn token (found by rendering a
    one-turn chat and reading the special token right after the assistant's text: <|im_end|> for
    ChatML, <|eot_id|> for Llama 3), plus the tokenizer's EOS and the model's generation_config EOS
    (Qwen1.5-Chat lists both <|im_end|> and <|endoftext|>)."""
    ids = []
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                         tokenize=False)
    after = tokenizer(text[text.rindex("ok") + 2:], add_special_tokens=False)["input_ids"]
    if after and tokenizer.convert_ids_to_tokens(after[0]) in tokenizer.get_added_vocab():
        ids.append(after[0])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def context_window(model, max_context: int | None) -> int:
    """Tokens the model attends over: --max_context, capped at the model's max_position_embeddings."""
    n = getattr(model.config, "max_position_embeddings", None) or 4096
    return min(n, max_context) if max_context else n


def encode_chat(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Prompt ids (1, T) of `messages` in the model's own chat template, ending with the assistant's turn start.
    sanitize_control_tokens: a user typing "<|im_end|>" gets the literal text, not a turn boundary."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt", sanitize_control_tokens=True)
    return enc["input_ids"]  # (1, T)


class StopFlag(StoppingCriteria):
    """Lets another thread end generation early (Ctrl-C, a stop string, a client gone) by setting an Event."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextPieces(BaseStreamer):
    """generate()'s streamer: each new token's text, sent the moment it completes valid UTF-8. Byte-level BPE
    splits a rare Chinese character or an emoji over 2-4 tokens: a token that only begins a character sends
    nothing, and the one that completes it sends the whole character, so no U+FFFD is ever sent (unless the
    model itself emits invalid UTF-8) and the pieces add up to tokenizer.decode(new tokens).
    TextIteratorStreamer instead holds text back until a word or a CJK character looks finished, and tokenizers'
    DecodeStream until a token ends on a character boundary: a token holding "反向传" and the first bytes of "播"
    would hold "反向传" back for a token. Iterating gives (text, tokens generated so far); it ends after end()."""

    def __init__(self, tokenizer):
        self.decode, self.queue, self.prompt = tokenizer.decode, queue.Queue(), True
        self.ids: list[int] = []
        self.start = self.sent = self.total = 0  # window start (token); its characters sent; characters sent overall

    def put(self, value: torch.Tensor) -> None:  # generate() passes the prompt (1, T) first, then (1,) per step
        if self.prompt:
            self.prompt = False
            return
        for token in value.reshape(-1).tolist():
            self.ids.append(token)
            # Decode a short window, not the whole answer: O(1) per token. Characters still missing bytes
            # decode as U+FFFD at the end; everything before them is final.
            text = self.decode(self.ids[self.start:], skip_special_tokens=True)
            done = len(text.rstrip("\ufffd"))
            if done > self.sent:
                self.queue.put((text[self.sent:done], len(self.ids)))
                self.total += done - self.sent
                self.sent = done
            if done == len(text) and len(self.ids) - self.start > 1:
                # On a character boundary: the window restarts at this token, kept as context (a SentencePiece
                # decoder drops the leading space of a window's first token).
                self.start = len(self.ids) - 1
                self.sent = len(self.decode(self.ids[self.start:], skip_special_tokens=True))

    def end(self) -> None:
        # An answer cut off mid-character (max_tokens, cancel): its last bytes go out as decode() shows them
        if rest := self.decode(self.ids, skip_special_tokens=True)[self.total:]:
            self.queue.put((rest, len(self.ids)))
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            yield item


class Generation:
    """One answer, streamed while it is generated: model.generate runs in a background thread and TextPieces
    hands each token's text to whoever iterates (chat.py's main thread, so that Ctrl-C lands there; serve.py's
    worker thread). Iterate once; afterwards `text`, `prompt_tokens`, `completion_tokens` and `finish_reason`
    ("stop": end-of-turn token or stop string, "length": the cap, None: cancelled) are set.

    `stop` strings end the answer early, OpenAI-style: the stop string and all after it are never yielded,
    so up to len(longest stop string) - 1 characters are held back until they cannot begin one.
    Leaving the loop early (an exception, or close() of the generator: a client gone) stops the model.
    """

    def __init__(self, model, tokenizer, input_ids: torch.Tensor, gen_kwargs: dict, seed: int | None = None,
                 adapter: bool = True, stop: tuple[str, ...] = ()):
        self.prompt_tokens, self.stop_strings = input_ids.shape[1], [s for s in stop if s]
        self.eos_ids, self.text, self.finish_reason = set(gen_kwargs["eos_token_id"]), "", None
        self.new_ids, self.error = None, None
        self.ends: list[tuple[int, int]] = []  # (characters of text, tokens generated) after each piece received
        self.streamer = TextPieces(tokenizer)
        self.flag = StopFlag()
        self.thread = threading.Thread(target=self._work, args=(model, input_ids, gen_kwargs, seed, adapter),
                                       daemon=True)
        self.thread.start()

    def _work(self, model, input_ids, gen_kwargs, seed, adapter):
        try:
            if seed is not None:
                set_seed(seed)  # the same RNG state for every answer: reproducible sampling, a fair --compare
            input_ids = input_ids.to(model.device)
            with torch.inference_mode(), (model.disable_adapter() if not adapter else nullcontext()):
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     streamer=self.streamer, stopping_criteria=StoppingCriteriaList([self.flag]),
                                     **gen_kwargs)
            self.new_ids = out[0, input_ids.shape[1]:].tolist()  # generated tokens only
        except BaseException as e:  # re-raised by the iterating thread; end the stream so it doesn't wait forever
            self.error = e
            self.streamer.queue.put(None)

    def cancel(self) -> None:
        self.flag.event.set()  # generate() checks it after the next token

    def __iter__(self):
        hold = max(map(len, self.stop_strings), default=1) - 1
        pending, hit_stop = "", False
        try:
            for piece, n_tokens in self.streamer:
                pending += piece
                self.ends.append((len(self.text) + len(pending), n_tokens))
                cut = min((i for i in (pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
                if cut >= 0:
                    pending, hit_stop = pending[:cut], True
                    self.cancel()
                    break
                if len(pending) > hold:
                    yield self._emit(pending[:len(pending) - hold])
                    pending = pending[len(pending) - hold:]
            if pending:
                yield self._emit(pending)
        except BaseException:  # Ctrl-C in chat.py, GeneratorExit when serve.py's client is gone
            self.cancel()
            raise
        finally:
            self.thread.join()
        if self.error is not None:
            raise self.error
        ended = hit_stop or (self.new_ids and self.new_ids[-1] in self.eos_ids)
        self.finish_reason = "stop" if ended else None if self.flag.event.is_set() else "length"  # None: cancelled

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece

    @property
    def completion_tokens(self) -> int:
        """Tokens that make up `text`: up to the one that completed its last character. Not counted: the
        end-of-turn token, tokens of a stop string and any generated after it (text that was never returned)."""
        return next((n for chars, n in self.ends if chars >= len(self.text)), 0) if self.text else 0


class ChatSession:
    """One conversation: an optional system prompt and the (user, assistant) turns so far.

    Each reply renders system + kept turns + the new user message with the tokenizer's chat template.
    When that exceeds `max_prompt_tokens` (context window - max_new_tokens), the oldest turns are
    dropped for good, so the KV cache of every generation fits the window.
    """

    def __init__(self, model, tokenizer, gen_kwargs: dict, max_prompt_tokens: int, system: str | None = None,
                 seed: int = 0, log=print, verbose: bool = False):
        self.model, self.tokenizer, self.gen_kwargs = model, tokenizer, gen_kwargs
        self.max_prompt_tokens, self.system, self.seed = max_prompt_tokens, system, seed
        self.log, self.verbose = log, verbose
        self.turns: list[tuple[str, str]] = []

    def reset(self):
        self.turns = []

    def messages(self, user: str, turns: list[tuple[str, str]]) -> list[dict]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return messages + [{"role": "user", "content": user}]

    def encode(self, messages: list[dict]) -> torch.Tensor:
        return encode_chat(self.tokenizer, messages)  # (1, T)

    def build_prompt(self, user: str) -> torch.Tensor:
        """Prompt ids (1, T) for the next answer; drops the oldest turns until T <= max_prompt_tokens.
        A message too long on its own raises UsageError and leaves the history as it was."""
        kept = list(self.turns)
        input_ids = self.encode(self.messages(user, kept))
        while input_ids.shape[1] > self.max_prompt_tokens and kept:
            kept.pop(0)
            input_ids = self.encode(self.messages(user, kept))
        if input_ids.shape[1] > self.max_prompt_tokens:
            raise UsageError(f"message too long: {input_ids.shape[1]} prompt tokens > {self.max_prompt_tokens} "
                             f"(context window - max_new_tokens); shorten it or lower --max_new_tokens")
        if len(kept) < len(self.turns):
            self.log(f"note: dropped the {len(self.turns) - len(kept)} oldest turn(s) to fit {self.max_prompt_tokens} "
                     f"prompt tokens (context window - max_new_tokens)")
            self.turns = kept
        return input_ids

    def reply(self, user: str, on_text=None, adapter: bool = True) -> str:
        """Answer `user` given the history, stream text pieces to on_text(str), add the turn to the history.
        adapter=False answers with the LoRA adapter switched off (the base model's answer)."""
        input_ids = self.build_prompt(user)
        if self.verbose:
            rendered = self.tokenizer.decode(input_ids[0], skip_special_tokens=False)
            self.log(f"----- rendered prompt ({input_ids.shape[1]} tokens) -----\n{rendered}\n"
                     f"----- end of prompt -----")
        start = time.perf_counter()
        generation = Generation(self.model, self.tokenizer, input_ids, self.gen_kwargs, self.seed, adapter)
        for piece in generation:  # Ctrl-C here stops the model and propagates
            if on_text is not None:
                on_text(piece)
        if self.verbose:
            seconds, n = time.perf_counter() - start, generation.completion_tokens
            self.log(f"[{n} tokens in {seconds:.1f} s, {n / seconds:.1f} tokens/s]")
        answer = generation.text.strip()
        self.turns.append((user, answer))
        return answer


def generation_kwargs(max_new_tokens: int, stop_ids: list[int], pad_id: int | None, greedy: bool,
                      temperature: float = 0.7, top_p: float = 0.8, top_k: int = 20,
                      repetition_penalty: float | None = None) -> dict:
    """model.generate() arguments. Greedy is plain argmax: sampling knobs off and no repetition penalty
    unless one is given explicitly (a penalty would change memorised answers)."""
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": stop_ids,
              "pad_token_id": pad_id if pad_id is not None else stop_ids[0], "use_cache": True}
    if greedy:
        kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50,
                      repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                      repetition_penalty=1.05 if repetition_penalty is None else repetition_penalty)
    return kwargs


def cli_generation_kwargs(args, stop_ids: list[int], pad_id: int | None) -> dict:
    """generation_kwargs from chat.py's / serve.py's generation flags."""
    return generation_kwargs(args.max_new_tokens, stop_ids, pad_id, args.greedy, args.temperature, args.top_p,
                             args.top_k, args.repetition_penalty)


def load_for_chat(args, base: str, log=print):
    """(model, tokenizer, context window, stop ids) for chat.py's / serve.py's model flags."""
    quantization = args.quantization
    if quantization == "auto":  # what the adapter was trained against (see chat.py), else by device
        quantization = args.trained_quantization or ("4bit" if torch.cuda.is_available() else "none")
    log(f"loading {base} ({quantization})" + (f" + adapter {args.adapter}" if args.adapter else ""))
    try:
        model, tokenizer = load_chat_model(base, args.adapter, quantization, args.trust_remote_code)
    except UsageError as e:
        where = (f" (base model read from {args.adapter}/adapter_config.json; pass --model_name_or_path to load "
                 f"another copy)" if args.adapter and not args.model_name_or_path else "")
        raise UsageError(f"{e}{where}") from e
    window = context_window(model, args.max_context)
    if args.max_new_tokens >= window:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the prompt in a "
                         f"{window}-token context window")
    stop_ids = end_of_turn_ids(tokenizer, model)
    log(f"on {model.device} in {model.dtype}; stop tokens {tokenizer.convert_ids_to_tokens(stop_ids)}, "
        f"context window {window} tokens")
    return model, tokenizer, window, stop_ids


def open_session(args, base: str, log=print) -> ChatSession:
    """Load the model for chat.py's flags and start an empty conversation."""
    model, tokenizer, window, stop_ids = load_for_chat(args, base, log)
    return ChatSession(model, tokenizer, cli_generation_kwargs(args, stop_ids, tokenizer.pad_token_id),
                       max_prompt_tokens=window - args.max_new_tokens, system=args.system, seed=args.seed,
                       log=log, verbose=args.verbose)


# ---------------------------------------------------------------- merging

def base_dtype(base: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the base checkpoint is stored in (config.json's dtype: bf16 for Qwen1.5), fp32 if unrecorded."""
    dtype = getattr(AutoConfig.from_pretrained(str(base), trust_remote_code=trust_remote_code), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def nf4_base(base: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """The base as the QLoRA adapter saw it in training: quantised to NF4 exactly as finetune.py does (on the
    GPU when there is one, like training), every 4-bit weight de-quantised, moved to CPU in `dtype`."""
    model = load_model(base, quantization="4bit", trust_remote_code=trust_remote_code)
    model = model.dequantize(dtype=dtype)  # bnb Linear4bit -> nn.Linear holding dequant(NF4(W))
    return model.to(device="cpu", dtype=dtype)


def merge_adapter(base: str, adapter: Path, out_dir: Path, trust_remote_code: bool = False,
                  merge_from: str = "original", log=print) -> None:
    """Fold the LoRA update into the base weights (W <- W + (alpha/r) B A) and save a standalone model
    in the base's own dtype (bf16 for Qwen1.5: a 3.7 GB model, not a 7 GB fp32 copy).

    merge_from="original": W = the base's own weights, the usual merge. For an adapter trained in 4-bit
      (QLoRA) this is a slightly different model from the one trained: B A was fitted to dequant(NF4(W)).
    merge_from="nf4": W = dequant(NF4(W)), the weights the QLoRA adapter was trained against, so the merged
      model answers like 4-bit base + adapter, at full-precision speed (it carries the 4-bit rounding).
    Never merged into the 4-bit weights themselves: re-quantising W + BA would drown the small update in
    the 4-bit rounding. The merge runs in CPU RAM; written to a temp dir, then renamed: no half-written model.
    """
    dtype = base_dtype(base, trust_remote_code)
    log(f"merging {adapter} into {base} ({merge_from} weights, saved in {str(dtype).removeprefix('torch.')}) ...")
    tokenizer = load_tokenizer(base, trust_remote_code)
    if merge_from == "nf4":
        model = nf4_base(base, dtype, trust_remote_code)
    else:
        model = load_model(base, quantization="none", trust_remote_code=trust_remote_code, device_map={"": "cpu"},
                           dtype=dtype)
    model = attach_adapter(model, adapter, base).merge_and_unload()  # plain transformers model again
    # Batched generation appends new tokens on the right, so pad on the left. save_pretrained writes
    # init_kwargs, not the attribute: set both.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)      # config.json, generation_config.json, model.safetensors
        tokenizer.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json, chat template
        if out_dir.is_dir():  # chat.py only allows an empty one
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"saved merged model ({n_params:,} params, {str(model.dtype).removeprefix('torch.')}) -> {out_dir}")

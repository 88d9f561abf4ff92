"""The model side of chat.py: load base + LoRA adapter, render a conversation with the model's own
chat template (dropping the oldest turns to fit the context window), stream one answer from a
background thread, and merge the adapter into a standalone model.
"""

import os
import shutil
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel
from qlora_model import UsageError, compute_dtype, load_model_and_tokenizer
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, set_seed


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
    """Tokens the model attends over: its max_position_embeddings, or less when asked (the KV cache
    of a 32k-token Qwen1.5-1.8B chat alone is ~6 GB in fp16)."""
    n = getattr(model.config, "max_position_embeddings", None) or 4096
    return min(n, max_context) if max_context else n


class StopFlag(StoppingCriteria):
    """Lets the main thread end generation early (Ctrl-C) by setting an Event."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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
        # sanitize_control_tokens: a user typing "<|im_end|>" gets the literal text, not a turn boundary.
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                 return_tensors="pt", sanitize_control_tokens=True)
        return enc["input_ids"]  # (1, T)

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
        answer = self.generate(input_ids, on_text, adapter)
        self.turns.append((user, answer))
        return answer

    def generate(self, input_ids: torch.Tensor, on_text=None, adapter: bool = True) -> str:
        """Run model.generate in a background thread; TextIteratorStreamer hands decoded text pieces
        to this (main) thread as tokens arrive. Ctrl-C stops generation and re-raises KeyboardInterrupt."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = StopFlag()
        result: dict = {}
        input_ids = input_ids.to(self.model.device)

        def work():
            try:
                set_seed(self.seed)  # every answer samples from the same RNG state: reproducible, fair --compare
                with torch.inference_mode(), (self.model.disable_adapter() if not adapter else nullcontext()):
                    result["ids"] = self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([stop]), **self.gen_kwargs)
            except BaseException as e:  # re-raised in the main thread; end the stream so it doesn't wait forever
                result["error"] = e
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if on_text is not None:
                    on_text(piece)
        except KeyboardInterrupt:
            stop.event.set()  # generate() checks it after the next token
            thread.join()
            raise
        thread.join()
        if "error" in result:
            raise result["error"]
        new_ids = result["ids"][0, input_ids.shape[1]:]  # (T_new,) generated tokens only
        if self.verbose:
            seconds = time.perf_counter() - start
            self.log(f"[{len(new_ids)} tokens in {seconds:.1f} s, {len(new_ids) / seconds:.1f} tokens/s]")
        return self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def generation_kwargs(args, stop_ids: list[int], pad_id: int | None) -> dict:
    """model.generate() arguments from the CLI flags. --greedy is plain argmax: sampling knobs off and
    no repetition penalty unless one is given explicitly (a penalty would change memorised answers)."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "eos_token_id": stop_ids,
              "pad_token_id": pad_id if pad_id is not None else stop_ids[0], "use_cache": True}
    if args.greedy:
        kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50,
                      repetition_penalty=args.repetition_penalty or 1.0)
    else:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      repetition_penalty=args.repetition_penalty or 1.05)
    return kwargs


def open_session(args, base: str, log=print) -> ChatSession:
    """Load the model for chat.py's flags and start an empty conversation."""
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
    log(f"stop tokens {tokenizer.convert_ids_to_tokens(stop_ids)}, context window {window} tokens")
    return ChatSession(model, tokenizer, generation_kwargs(args, stop_ids, tokenizer.pad_token_id),
                       max_prompt_tokens=window - args.max_new_tokens, system=args.system, seed=args.seed,
                       log=log, verbose=args.verbose)


def merge_adapter(base: str, adapter: Path, out_dir: Path, trust_remote_code: bool = False, log=print) -> None:
    """Fold the LoRA update into the base weights (W <- W + (alpha/r) B A) and save a standalone model.

    The base is reloaded unquantized, never in 4-bit: merging into NF4 weights would re-quantize W + BA,
    and the small update would drown in the 4-bit rounding. dtype = the machine's compute dtype: bf16
    (fp16 on pre-Ampere GPUs) where there is a GPU, fp32 on CPU-only machines. The merge runs in CPU RAM
    so a small GPU never runs out of memory. Written to a temp dir, then renamed: no half-written model.
    """
    dtype = compute_dtype()
    log(f"merging {adapter} into {base} ({str(dtype).removeprefix('torch.')}, on CPU) ...")
    model, tokenizer = load_model_and_tokenizer(base, quantization="none", trust_remote_code=trust_remote_code,
                                                device_map={"": "cpu"})
    model = attach_adapter(model, adapter, base).merge_and_unload()  # plain transformers model again
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
    log(f"saved merged model ({n_params:,} params) -> {out_dir}")

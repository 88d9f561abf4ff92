"""Chat with the base model + the LoRA adapter qlora_minimal.py trained: streamed answers, multi-turn history.

    python phase2_lora/chat_minimal.py --adapter checkpoints/qwen1.5-1.8b-lora-minimal      # type, Enter; Ctrl-D ends
    printf '你是谁？\\n/reset\\nLoRA 是什么？\\n' | python phase2_lora/chat_minimal.py --model_name_or_path \\
        checkpoints/tiny-qwen --adapter checkpoints/tiny-lora-minimal                    # piped: one turn per line

Each stdin line is the next user turn of one conversation; the line /reset starts a new one. Each answer goes to
stdout after the prefix "assistant: ", streamed as it is generated, and ends with a newline (greedy decoding, so
answers are reproducible). chat.py is the full tool: sampling, context window, merge, before/after comparison.
"""

import argparse
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TextStreamer
from transformers.utils import logging as hf_logging


def main():
    p = argparse.ArgumentParser(description="Chat with base model + LoRA adapter (stdin lines are user turns)")
    p.add_argument("--model_name_or_path", default="Qwen/Qwen1.5-1.8B-Chat")
    p.add_argument("--adapter", default="checkpoints/qwen1.5-1.8b-lora-minimal", help="qlora_minimal's --output_dir")
    p.add_argument("--max_new_tokens", type=int, default=512)
    args = p.parse_args()
    if not sys.stderr.isatty():  # a log file gets plain lines, not tqdm's \r progress bars
        hf_logging.disable_progress_bar()

    # The base exactly as qlora_minimal.py trained on it (4-bit NF4): the adapter learnt to correct these weights.
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, quantization_config=quant, dtype=dtype,
                                                device_map={"": 0 if cuda else "cpu"})
    model = PeftModel.from_pretrained(base, args.adapter).eval()  # base + (alpha / r) B A on every adapted layer
    # Stop at the end of the assistant's turn, <|im_end|> (what the fine-tune taught it to emit after each answer);
    # <|endoftext|> too, as Qwen's generation_config does.
    stop_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # Prints each piece of text as soon as it is decoded; skips the prompt and the special tokens (<|im_end|>).
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    messages = []  # the conversation so far: the model sees all of it, every turn (it has no memory of its own)
    for line in sys.stdin:
        if line.strip() == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": line.strip()})
        # The same chat template as in training, ending with "<|im_start|>assistant\n": the model's turn to write.
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        print("assistant: ", end="", flush=True)
        with torch.no_grad():
            out = model.generate(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)  # new tokens only
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    main()

"""QLoRA fine-tuning in one file: read it top to bottom, then retype it from memory.

    python phase2_lora/qlora_minimal.py                       # the real recipe: Qwen1.5-1.8B-Chat on Alpaca, 8 GB GPU
    python phase2_lora/make_tiny_model.py --output_dir checkpoints/tiny-qwen     # the offline smoke run (CPU, ~1 min)
    OMP_NUM_THREADS=1 python phase2_lora/qlora_minimal.py --model_name_or_path checkpoints/tiny-qwen \
        --data_path data/persona_zh.json --output_dir checkpoints/tiny-lora-minimal \
        --max_samples 8 --max_steps 30 --lr 2e-2

The recipe: a frozen base in 4-bit NF4 + small trainable LoRA matrices (peft) + the model's own chat template +
labels on the answers only + the stock transformers Trainer, then the adapter (a few MB) is saved.
finetune.py is the hardened, measured version of this file (phase2_lora/README.md says what it adds and why);
tests/acceptance/test_grade_qlora_minimal.py grades this file or your rewrite of it.
"""

import argparse
import json
import sys

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

# The real recipe (an RTX 4060 with 8 GB); the flags below override only what a quick run must change.
MODEL = "Qwen/Qwen1.5-1.8B-Chat"
DATA = "data/alpaca_data_cleaned.json"                 # 52k Alpaca records: instruction, input, output
OUTPUT_DIR = "checkpoints/qwen1.5-1.8b-lora-minimal"
MAX_LEN = 512                                          # tokens; the few longer records are dropped
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05        # the update is (alpha / r) B A, B (out, r), A (r, in)
LR, EPOCHS, BATCH, GRAD_ACCUM = 2e-4, 1, 4, 4          # QLoRA paper's lr; 16 sequences per optimizer step
IGNORE = -100                                          # label value the cross-entropy loss skips
CUDA = torch.cuda.is_available()
# bf16 on the GPU (Ampere or later; finetune.py picks fp16 on older cards); CPU matmuls run in fp32.
DTYPE = torch.bfloat16 if CUDA else torch.float32


def tokenize(record: dict, tokenizer) -> dict:
    """An Alpaca record -> input_ids and labels: -100 on the prompt, the answer's ids on the answer."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    chat = [{"role": "user", "content": user}]
    # The model's own chat template, exactly as chat_minimal.py will render the question at inference:
    # <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    # The answer is tokenised on its own, not in one text with the prompt: there an answer that starts with "\n"
    # merges with the prompt's last "\n" (Qwen: 198 198 -> 271), a prompt the model never sees at inference.
    # Its <|im_end|> is a training target, so the model learns to stop there (mask it, and the chat never ends).
    # Nothing after <|im_end|> (the template's "\n") is trained, so it is left out.
    answer = tokenizer(record["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    # -100 on the prompt: the loss covers only the answer, the model is not trained to write the questions.
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def main():
    p = argparse.ArgumentParser(description="QLoRA in one file (constants at the top hold the real recipe)")
    p.add_argument("--model_name_or_path", default=MODEL)
    p.add_argument("--data_path", default=DATA, help="Alpaca JSON list: instruction, input, output")
    p.add_argument("--output_dir", default=OUTPUT_DIR)
    p.add_argument("--max_samples", type=int, default=None, help="train on the first N records only")
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps (default: EPOCHS over the data)")
    p.add_argument("--lr", type=float, default=LR)
    args = p.parse_args()
    if not sys.stderr.isatty():  # a log file gets plain lines, not tqdm's \r progress bars
        hf_logging.disable_progress_bar()
    set_seed(42)  # LoRA's random A, then the Trainer's shuffling: the same run twice gives the same adapter

    # ---- data: chat template + answer-only labels
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    tokenizer.padding_side = "right"  # prompts start at position 0; pads go after <|im_end|>, masked
    with open(args.data_path, encoding="utf-8") as f:
        records = json.load(f)[:args.max_samples]
    # A list of dicts is all the Trainer needs from a dataset: len() and [i].
    train = [ex for ex in (tokenize(r, tokenizer) for r in records) if len(ex["input_ids"]) <= MAX_LEN]
    print(f"{len(train)} training examples ({len(records) - len(train)} longer than {MAX_LEN} tokens dropped)")

    # ---- model: 4-bit NF4 base + LoRA
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",         # NF4: 16 levels at the quantiles of N(0, 1), the shape of trained weights
        bnb_4bit_use_double_quant=True,    # quantise the per-64-weight scales too: ~0.4 bit per weight saved
        bnb_4bit_compute_dtype=DTYPE,      # each matmul de-quantises its block of weights to this dtype
    )
    # 1.8B weights: 3.6 GB in bf16, ~1 GB in NF4 (embeddings and lm_head stay unquantised): that is the room
    # an 8 GB card needs for activations, LoRA gradients and Adam states.
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, quantization_config=quant, dtype=DTYPE,
                                                 device_map={"": 0 if CUDA else "cpu"})
    # Freezes every base weight, casts the unquantised ones (norms, embeddings) to fp32 for stable numerics,
    # and turns on gradient checkpointing: each layer's activations are recomputed in backward, memory for compute
    # (non-reentrant: the recommended checkpoint, which needs no trainable input to the checkpointed layers).
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    # LoRA on every linear layer but lm_head (peft's "all-linear"): A random, B zero, so training starts from the
    # base model exactly. Only these ~15M parameters (0.8% of 1.8B) get gradients and optimizer states.
    lora = LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                      target_modules="all-linear")
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    # ---- train: the stock Trainer
    training_args = TrainingArguments(
        disable_tqdm=not sys.stderr.isatty(),   # the bar on a terminal; loss lines in a log
        output_dir=args.output_dir,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=GRAD_ACCUM,   # 4 x 4 = 16 sequences per step in the memory of 4
        num_train_epochs=EPOCHS,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,                        # a float < 1: the fraction of all steps
        optim="paged_adamw_8bit" if CUDA else "adamw_torch",  # 8-bit Adam states, paged to RAM on spikes
        bf16=CUDA,                                # autocast the LoRA and unquantised math on the GPU
        logging_steps=10,
        save_strategy="no",                       # only the final adapter is saved, below
        report_to="none",
    )
    # Pads each batch to its longest example: input_ids with the pad token, labels with -100 (not trained). The
    # labels were set above by position, never by comparing ids with pad_token_id: where pad == eos == <|im_end|>
    # (a common setup) that comparison would mask the very token the model must learn to stop with.
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
    trainer.train()

    # ---- save: the adapter only (adapter_config.json + adapter_model.safetensors) and the tokenizer
    model.save_pretrained(args.output_dir)  # load with PeftModel.from_pretrained(base, output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"adapter -> {args.output_dir}")


if __name__ == "__main__":
    main()

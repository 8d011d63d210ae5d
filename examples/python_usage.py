import sys

from flythinker import FlyThinker, encode_chat

checkpoint = sys.argv[1] if len(sys.argv) > 1 else "runs/demo/product_review/flythinker/checkpoint"
model = FlyThinker.from_pretrained(checkpoint)
# The chat template, as training rendered prompts: without it a chat model ends its turn at once.
batch = encode_chat(model.tokenizer, ["Write a review of the blue kettle."], max_prompt_tokens=1550)
out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=64,
                     do_sample=True, temperature=0.8, top_p=0.95, seed=0,
                     on_token=lambda t: print(model.tokenizer.decode(t[0], skip_special_tokens=True), end="", flush=True))
print()
print(model.tokenizer.batch_decode(out.sequences, skip_special_tokens=True))

"""One-off script that built src/flythinker/assets/tiny_tokenizer (kept in tools/ for provenance).

The shipped tokenizer was trained on two English design and data notes of this project; any few
pages of English text give a byte-level BPE of the same kind:
    python tools/make_tiny_tokenizer.py README.md docs/method.md
"""
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

if len(sys.argv) < 2:
    sys.exit("usage: python tools/make_tiny_tokenizer.py TEXT_FILE [TEXT_FILE ...]")
corpus = [Path(arg).read_text() for arg in sys.argv[1:]]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(corpus, trainer)
chat = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None, chat_template=chat, model_max_length=4096)
out = Path("src/flythinker/assets/tiny_tokenizer")
fast.save_pretrained(out)
print(len(fast), fast.eos_token_id, fast.pad_token_id)
print(fast.apply_chat_template([{"role":"user","content":"Hello wörld 🙂"}], tokenize=False, add_generation_prompt=True))
ids = fast("Hello wörld 🙂")["input_ids"]; print(ids, fast.decode(ids))

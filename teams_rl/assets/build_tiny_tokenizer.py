"""Rebuild the committed tiny tokenizer: `python -m teams_rl.assets.build_tiny_tokenizer`.

A 1,024-token byte-level BPE trained on a few paragraphs of instruction-style English, with a ChatML chat
template like SmolLM2's. Byte-level means any text round-trips, so it works for every test and the
`tiny_llama` target; small means sequences stay short and tiny models stay tiny.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = """
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Below is an instruction that describes a task, paired with an input that provides further context.
### Instruction: ### Input: ### Response:
Give three tips for staying healthy. Eat a balanced diet, exercise regularly and get enough sleep.
What are the three primary colors? The three primary colors are red, blue and yellow.
Describe the structure of an atom. An atom is made of a nucleus of protons and neutrons, surrounded by electrons.
How can we reduce air pollution? We can use public transport, plant trees and switch to clean energy.
Explain why the sky is blue. Sunlight is scattered by the molecules of the air, and blue light is scattered most.
Write a short story about a robot who learns to paint. Summarize the plot of a famous novel in two sentences.
Translate the following sentence into French. Convert the temperature from Celsius to Fahrenheit.
List five countries in Europe and their capitals: France, Paris; Spain, Madrid; Italy, Rome; Germany, Berlin.
Rewrite the prompt to add one more constraint or requirement. Make the question deeper and broader.
Replace general concepts with more specific concepts. Require multiple steps of reasoning explicitly.
Create a brand new prompt in the same domain that is rarer, with similar length and difficulty.
Add structured input data such as a table, JSON or code to the prompt. #Given Prompt# #Rewritten Prompt#
Are the two instructions equal? Answer Equal or Not Equal. The first instruction. The second instruction.
Question: Which gas do plants absorb from the air? Answer: carbon dioxide, oxygen, nitrogen, helium.
The cat sat on the mat. A quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make sugar.
Calculate the area of a circle with a radius of 5 centimeters. The answer is about 78.54 square centimeters.
Write a Python function that returns the factorial of a number. def factorial(n): return 1 if n < 2 else n * factorial(n - 1)
{"name": "Alice", "age": 30, "city": "London"} | Name | Age | City | |------|-----|------| | Bob | 25 | Paris |
Compose a haiku about autumn leaves. Generate a list of ideas for a birthday party. Classify the sentiment.
What is the capital of Japan? Tokyo is the capital of Japan. How many days are in a leap year? 366 days.
Explain the difference between weather and climate, and give an example of each in a few sentences.
I am sorry, but I cannot help with that request. Thank you! Yes. No. Maybe. True or false?
Sort the numbers 9, 2, 7, 4 and 1 in ascending order: 1, 2, 4, 7, 9. The sum of 12 and 30 is 42.
The history of the Roman Empire spans many centuries, from the founding of the city to the fall of the west.
Machine learning models learn patterns from data; reinforcement learning agents learn from rewards.
"""

SPECIALS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                 pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)


if __name__ == "__main__":
    build(Path(__file__).resolve().parent / "tiny_tokenizer")

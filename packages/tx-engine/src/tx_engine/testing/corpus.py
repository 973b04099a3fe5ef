"""The embedded training text for the tiny tokenizers.

A few kilobytes mixing the kinds of text tests and demos feed through a tokenizer: English prose
and chat turns, arithmetic word problems (the usual RL toy task), Python and JSON, numbers, and
multi-byte UTF-8 (accents, Cyrillic, Greek, CJK, emoji), so that merges exist for all of them
and byte fallback still covers anything else. Changing this text changes every tiny model:
bump `KIT_VERSION` when you do.
"""

CORPUS = r"""
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning he rowed out beyond the harbor, and every evening he came home with his nets.
The weather was calm today, but the forecast says it will rain tomorrow afternoon.
Machine learning models learn patterns from data. Training minimizes a loss function with gradient descent.
Fine-tuning adapts a pretrained model to a new task; low-rank adapters (LoRA) train only a few parameters.
The learning rate controls how large each update is. Too large and training diverges; too small and it crawls.
Reinforcement learning rewards the model for good answers and penalizes bad ones.
Sampling with temperature 0.7 and top-p 0.9 gives varied but coherent text.

User: What is the capital of France?
Assistant: The capital of France is Paris.
User: How many legs does a spider have?
Assistant: A spider has eight legs.
User: Can you help me write a short poem about the ocean?
Assistant: Sure! Waves that whisper, tides that turn, the ocean keeps what sailors learn.
System: You are a helpful assistant. Answer concisely and correctly.

Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May?
Answer: In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. The answer is 72.
Question: What is 12 * 7 + 3? Answer: 12 * 7 = 84, and 84 + 3 = 87. The answer is 87.
Question: A train travels 150 km in 2 hours. What is its average speed?
Answer: 150 / 2 = 75, so the average speed is 75 km/h. The answer is 75.
Let me think step by step. First, add the numbers. Then, divide by the count. Finally, check the result.
1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 75 100 128 256 512 1024 2048 4096
3.14159 2.71828 1.41421 0.5 0.25 -1 -42 1e-5 6.02e23 100% 3/4 $19.99 2024-07-26 12:30:45

def fibonacci(n: int) -> int:
    # Return the n-th Fibonacci number.
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Tokenizer:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [self.vocab[token] for token in text.split()]


if __name__ == "__main__":
    import json
    print(json.dumps({"name": "tx", "version": "0.1.0", "tags": ["lora", "jax"]}, indent=2))
    for i in range(10):
        print(f"step {i}: loss={1.0 / (i + 1):.4f}")

{"model_name": "Qwen/Qwen3-8B", "lora_rank": 32, "learning_rate": 1e-4, "batch_size": 128, "seed": 0}
{"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}]}
SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id LIMIT 10;
for (int i = 0; i < n; ++i) { sum += x[i] * w[i]; }
const result = items.filter((x) => x.score >= 0.5).map((x) => x.id);
https://example.com/docs/index.html?query=tokenizer&page=2#section-3

Le renard brun rapide saute par-dessus le chien paresseux. Où est la bibliothèque ? Très bien, merci.
Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München, schöne Straße.
El rápido zorro marrón salta sobre el perro perezoso. ¿Cómo estás? ¡Muy bien, señor!
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, как дела? Спасибо.
Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο. Καλημέρα κόσμε.
敏捷的棕色狐狸跳过了懒狗。你好，世界！今天天气很好。机器学习模型从数据中学习。
素早い茶色の狐がのろまな犬を飛び越える。こんにちは、世界。ありがとうございます。
빠른 갈색 여우가 게으른 개를 뛰어넘는다. 안녕하세요, 세계.
Emoji: 🙂 🚀 🔥 ✅ ❤️ 👍 🎉 — and symbols: € £ ¥ © ® ™ ± × ÷ ≤ ≥ ≠ ∞ √ ∑ π α β γ λ μ σ ω → ← ↑ ↓
Math: ∫₀¹ x² dx = 1/3, e^(iπ) + 1 = 0, a² + b² = c², Δx → 0, ∀ε > 0 ∃δ > 0.

The committee met on Tuesday to discuss the budget. After a long debate, they agreed to fund the new library.
Scientists observed that the samples, when heated to 100 degrees, changed color from blue to green.
Please remember to save your work often. If the program crashes, you can restore the last checkpoint.
She opened the window, looked at the stars, and wondered what the future would bring.
The results are shown in Table 2: accuracy improved from 81.5% to 88.2% after fine-tuning for 3 epochs.
In summary, the method is simple, fast, and works well in practice; future work will study larger models.
Thank you for your question! Here is a step-by-step explanation of how the algorithm works.
Dear team, thank you for joining the meeting this morning. Our goals for the next quarter are clear:
improve reliability, reduce latency, and ship the new checkpoint format. Each service will report its
health every minute, and alerts will page the on-call engineer when errors exceed one percent.
Recipe: mix two cups of flour, one teaspoon of salt, and a cup of warm water. Knead the dough for ten
minutes, let it rest for an hour, then bake it at 220 degrees for twenty-five minutes until golden.
History: the printing press, invented around 1440, made books cheaper and spread literacy across Europe.
Geography: the Nile is the longest river in Africa; Mount Everest, at 8,849 meters, is the highest peak.
Physics: energy equals mass times the speed of light squared. Light travels about 299,792 kilometers per second.
Biology: cells divide by mitosis; DNA stores genetic information in sequences of four bases, A, C, G and T.
Economics: when demand rises and supply stays fixed, prices tend to increase until the market clears.

@dataclass(frozen=True)
class Config:
    hidden_size: int = 512
    num_layers: int = 8
    dropout: float = 0.0

    def validate(self) -> None:
        if self.hidden_size % 64 != 0:
            raise ValueError("hidden_size must be a multiple of 64")


async def fetch(client, url: str, retries: int = 3) -> bytes:
    for attempt in range(retries):
        try:
            response = await client.get(url, timeout=30.0)
            response.raise_for_status()
            return response.content
        except TimeoutError:
            await asyncio.sleep(2 ** attempt)
    raise RuntimeError(f"failed after {retries} attempts: {url}")

$ pip install numpy==2.1.0 && python -m pytest tests/ -q -x
PASSED tests/test_model.py::test_forward [ 50%]  FAILED tests/test_model.py::test_backward - AssertionError
Error: file not found. Warning: the value is out of range. Info: training started at step 0.
"""

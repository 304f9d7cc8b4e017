"""Text samples shared by the tokenizer tests (Llama 3 vs Meta, GGUF vs HF): empty, ASCII, accents and symbols,
many scripts, emoji sequences (ZWJ, flags, skin tones), surrounding spaces."""

VARIED_TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café déjà vu — Ünïcödé “quotes” ‘single’ «guillemets» ½ ² ℃ ﬁ",
    "日本語のテキスト、中文文本，한국어 텍스트 — Русский текст, Ελληνικά, العربية, हिन्दी, ไทย",
    "emoji 🦙🔥 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️ family: 👨‍👩‍👧",
    "   leading and trailing spaces   ",
]

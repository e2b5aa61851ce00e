"""Fine-tuning: training data from a knowledge base, SFT of the LLM (LoRA, QLoRA, P-Tuning v2,
full; DeepSpeed ZeRO), and fine-tuning of the embedding model."""

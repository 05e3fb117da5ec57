"""Per-client fine-tuning: the collator (labels, log-mel), the Seq2SeqTrainer wiring, and the launcher."""

"""Training: the one loop (`loop`), pretraining runs (`pretrain`), fine-tuning (`finetune`) and resume checks (`resume`)."""

"""Using a model: sliding-window segmentation (`segment`), explanation maps (`explain`), scoring (`evaluate`)."""

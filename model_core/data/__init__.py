"""Data: preprocessing, procedural phantoms, pretraining sequences and fine-tuning crops.

`preprocess`: orientation, spacing and intensity normalisation, and back.
`phantoms`: the procedural CT abdomen and brain MRI phantoms (plain numpy).
`pretraining`: cases from folders, manifests and phantoms; the spatial / contrast / semantic sequences.
`finetuning`: class maps, prepared scans, augmented crops and the cached-feature dataset.
"""

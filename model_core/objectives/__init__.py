"""Training objectives: modules that map a batch to {"loss", ...}.

`autoregressive`: next-token prediction (AR-SSL4M) and the masked-autoencoder baseline.
`segmentation`: Dice + cross-entropy on annotated voxels, layer-wise lr decay.
"""

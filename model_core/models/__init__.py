"""Networks: the ViT3D encoder (`vit`) and the segmentation decoders (`segmentation`)."""

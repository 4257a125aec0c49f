"""Meshes and large catalogs before paying for the machines: a config's train and evaluation
steps compiled for simulated CPU devices or a Cloud TPU slice's chips, their bytes a device
and FLOPs (`plan`), and the communication of the item-sharded loss, by hand against XLA's
partitioner (`loss_communication`).
"""

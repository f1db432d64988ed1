"""One model across several processes or machines, on torch.distributed, launched by torchrun.

group: the process group (gloo), its messages and how a lost rank is named. pipeline: the layer split,
rank 0's side of a forward pass and of the KV cache, and the loop the other ranks serve it with.
"""

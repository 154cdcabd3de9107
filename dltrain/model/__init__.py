"""The model role: the MLP and its weights.

    architecture.py  the MLP's shape, without torch: input and output sizes, the card's
                     architecture, the tensors it holds
    classes.py       the class names of each data set
    weights.py       models/model.safetensors and its card, read and checked without torch; the
                     numpy forward pass that evaluate, register and predict run
    mlp.py           the torch module (784-hidden-10, ReLU) that training builds
    torchio.py       saving and loading the torch module through weights.py
"""

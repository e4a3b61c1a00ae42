"""Opt-in fast paths: the same maths as the models' plain code, computed faster on a CPU.

    gemm            `Linear`: nn.Linear whose training products run on the faster of MKL and oneDNN
    cross_entropy   the language-modelling loss without ever holding all the logits
    dropout         `Dropout`: nn.Dropout whose mask takes a quarter of the random draws
    attention       `short_attention`: training attention on short sequences, one product for all blocks

Each model's own fast path (Llama's packed decoding: `fromscratch.llama.fast`) builds on these.
A model file never imports them: a user (or a training command) opts in, and every fast path is
tested to compute what the plain code computes.
"""

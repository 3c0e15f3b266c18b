"""The R-CONV attack: reading the network, each layer's equations and solve, activations, the error bound."""

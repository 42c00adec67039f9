"""The runtimes that move messages and state: in-process simulation and Flower."""

"""Native code: Sol's C++ kernels (int8 products, the one-call int8 decode step, the greedy pick) and the
Python that builds them at first use and calls them. The lowest layer: it imports nothing else of Sol's."""

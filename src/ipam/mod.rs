//! The pure IPAM engine: no I/O, every decision a function.

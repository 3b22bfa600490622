pub use rime_kernels as kernels;

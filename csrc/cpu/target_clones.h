// RNNEXT_CPU_CLONES: compile a function for AVX-512, AVX2 (with FMA) and baseline x86-64, and
// let the loader pick the best one the CPU runs; the binary stays portable (no -march=native).
// Only the function itself is cloned: a lambda inside it is compiled once, for the baseline.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define RNNEXT_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RNNEXT_CPU_CLONES
#endif

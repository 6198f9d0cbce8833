#pragma once
// Empty stand-in: the SIMT headers include it in CPU-debug builds; our kernels use no SIMT.

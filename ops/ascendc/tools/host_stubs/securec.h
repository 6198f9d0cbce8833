// Declarations of the bounds-checked C functions (libboundscheck) that the open metadef headers
// include; declarations only, for a syntax check of op_host code.
#pragma once
#include <cstddef>
#define EOK 0
typedef int errno_t;
errno_t memcpy_s(void* dest, size_t destMax, const void* src, size_t count);
errno_t memset_s(void* dest, size_t destMax, int c, size_t count);
errno_t memmove_s(void* dest, size_t destMax, const void* src, size_t count);
errno_t strcpy_s(char* dest, size_t destMax, const char* src);
errno_t strncpy_s(char* dest, size_t destMax, const char* src, size_t count);
int sprintf_s(char* dest, size_t destMax, const char* format, ...);
int snprintf_s(char* dest, size_t destMax, size_t count, const char* format, ...);

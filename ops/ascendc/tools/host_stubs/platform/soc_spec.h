#pragma once
// Empty stand-in: platform_ascendc.h includes it; nothing from it is used by op_host code.

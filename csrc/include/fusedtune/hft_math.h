// Half-fine-tuning family: MaskedAdamW uses the shared AdamW element rule.
#pragma once
#include "fusedtune/adamw_math.h"

namespace fusedtune {
namespace hft {
using fusedtune::AdamConsts;
using fusedtune::adamw;
}  // namespace hft
}  // namespace fusedtune

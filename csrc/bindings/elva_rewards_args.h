// Argument parsing shared by the CPU and CUDA bindings of elva_rewards.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

#include "elva/elva_rewards.h"

namespace elva::bindings {

inline AdvantageMode advantage_mode(c10::string_view advantage) {
  const std::string name(advantage);
  TORCH_CHECK_VALUE(name == "group" || name == "batch" || name == "none",
                    "advantage must be one of ('group', 'batch', 'none'); got '", name, "'");
  return name == "group" ? AdvantageMode::Group : name == "batch" ? AdvantageMode::Batch : AdvantageMode::None;
}

}  // namespace elva::bindings

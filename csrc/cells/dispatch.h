// Maps a run-time cell kind to its compile-time policy, so each backend writes its time loop
// once as a template and instantiates it for every cell here.
#pragma once

#include "gru.h"
#include "lstm.h"
#include "rnn.h"

namespace rnnext {
namespace cells {

enum class Kind { kRnnTanh, kRnnRelu, kGru, kLstm };

template <typename F>
decltype(auto) visit(Kind kind, F&& f) {
  switch (kind) {
    case Kind::kRnnTanh: return f(ElmanTanh{});
    case Kind::kRnnRelu: return f(ElmanRelu{});
    case Kind::kGru: return f(Gru{});
    default: return f(Lstm{});
  }
}

}  // namespace cells
}  // namespace rnnext

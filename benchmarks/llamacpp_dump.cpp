// llamacpp.py's probe into llama.cpp: decodes token ids one at a time (as llama-server does for each new
// token) and, at one step, writes every contiguous float32 tensor of llama.cpp's graph, so that Sol's block
// products can be fed llama.cpp's own inputs and compared with its outputs.
//
//   sol-llama-dump MODEL IDS_FILE OUT STEP [FLASH_ATTN -1/0/1] [KV f16/f32]
//
// IDS_FILE: token ids separated by spaces. OUT: records of (name, NUL, int64 ne[4], float32 data) for step
// STEP (0-based). Built by llamacpp.py against the static libraries of its llama.cpp build.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

static FILE* out = nullptr;

static bool on_tensor(struct ggml_tensor* t, bool ask, void*) {
  if (ask) return out != nullptr;
  if (!out || t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) return true;
  std::vector<float> buf(ggml_nelements(t));
  ggml_backend_tensor_get(t, buf.data(), 0, ggml_nbytes(t));
  fwrite(t->name, 1, strlen(t->name) + 1, out);
  fwrite(t->ne, sizeof(int64_t), 4, out);
  fwrite(buf.data(), sizeof(float), buf.size(), out);
  return true;
}

int main(int argc, char** argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s MODEL IDS_FILE OUT STEP [FLASH_ATTN] [KV]\n", argv[0]);
    return 2;
  }
  std::vector<llama_token> ids;
  FILE* f = fopen(argv[2], "r");
  if (!f) return 2;
  for (int x; fscanf(f, "%d", &x) == 1;) ids.push_back(x);
  fclose(f);
  const int step = atoi(argv[4]);
  const int fa = argc > 5 ? atoi(argv[5]) : 0;
  const std::string kv = argc > 6 ? argv[6] : "f32";
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (!model) return 1;
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = cp.n_batch = cp.n_ubatch = static_cast<uint32_t>(ids.size() + 1);
  cp.n_threads = cp.n_threads_batch = 2;
  cp.flash_attn_type = static_cast<llama_flash_attn_type>(fa);
  cp.type_k = cp.type_v = kv == "f32" ? GGML_TYPE_F32 : GGML_TYPE_F16;
  cp.cb_eval = on_tensor;
  llama_context* ctx = llama_init_from_model(model, cp);
  if (!ctx) return 1;
  for (int i = 0; i < static_cast<int>(ids.size()) && i <= step; ++i) {
    if (i == step && !(out = fopen(argv[3], "wb"))) return 1;
    if (llama_decode(ctx, llama_batch_get_one(&ids[i], 1))) return 1;
  }
  if (out) fclose(out);
  llama_free(ctx);
  llama_model_free(model);
  return out ? 0 : 1;
}

// Run a `drift-policy export format=aoti` package from C++ (libtorch of the same version as the exporting torch).
//
//   aoti_policy POLICY.pt2 OBS.f32 NOISE.f32 OUT.f32 B To D Tp Da
//
// OBS.f32: B x To x D float32 observations in data units (oldest first), NOISE.f32: B x Tp x Da standard normal
// noise, both raw little-endian float32; writes action_pred (B x Tp x Da, data units) to OUT.f32 and prints the
// executable chunk's shape. Build against the torch wheel (Linux):
//
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O2 -std=c++17 aoti_policy.cpp -I$T/include -I$T/include/torch/csrc/api/include \
//       -L$T/lib -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$T/lib -o aoti_policy
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

static at::Tensor read_f32(const std::string& path, std::vector<int64_t> shape) {
  at::Tensor t = at::empty(shape, at::kFloat);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(t.data_ptr<float>()), t.numel() * sizeof(float));
  if (!f) throw std::runtime_error("cannot read " + std::to_string(t.numel()) + " floats from " + path);
  return t;
}

int main(int argc, char** argv) {
  if (argc != 10) {
    std::cerr << "usage: aoti_policy POLICY.pt2 OBS.f32 NOISE.f32 OUT.f32 B To D Tp Da\n";
    return 2;
  }
  const int64_t B = std::stoll(argv[5]), To = std::stoll(argv[6]), D = std::stoll(argv[7]);
  const int64_t Tp = std::stoll(argv[8]), Da = std::stoll(argv[9]);
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::vector<at::Tensor> out = loader.run({read_f32(argv[2], {B, To, D}), read_f32(argv[3], {B, Tp, Da})});
    at::Tensor action_pred = out.at(1).contiguous();
    std::ofstream f(argv[4], std::ios::binary);
    f.write(reinterpret_cast<const char*>(action_pred.data_ptr<float>()), action_pred.numel() * sizeof(float));
    std::cout << "action " << out.at(0).sizes() << ", action_pred " << action_pred.sizes() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "aoti_policy: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

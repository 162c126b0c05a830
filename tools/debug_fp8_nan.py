"""Locate non-finite values in FP8 training on a GPU: kernels against their references on fp32 and
bf16 inputs, then one `small` training step with hooks that name the first non-finite module."""

import torch

from coscale.kernels import quant


def finite(*ts):
    return all(bool(torch.isfinite(t.float()).all()) for t in ts if t is not None and t.is_floating_point())


def check_quant():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1024, 2048, device="cuda", dtype=dtype)
        for name in ("act_quant_1x128", "act_quant_1x128_dual", "act_quant_128x1"):
            fn = getattr(quant, name)
            try:
                got, ref = fn(x, backend="triton"), fn(x, backend="torch")
                got = got if isinstance(got, tuple) else (got,)
                ref = ref if isinstance(ref, tuple) else (ref,)
                diffs = [int((g.view(torch.uint8) != r.view(torch.uint8)).sum()) if g.dtype == torch.float8_e4m3fn
                         else float((g.float() - r.float()).abs().max()) for g, r in zip(got, ref)]
                print(f"{name} {dtype}: shapes {[tuple(g.shape) for g in got]} diffs {diffs} "
                      f"finite {finite(*[g.float() for g in got])}")
            except Exception as e:  # noqa: BLE001
                print(f"{name} {dtype}: ERROR {type(e).__name__}: {str(e)[:200]}")
        w = torch.randn(768, 2048, device="cuda", dtype=dtype)
        for name in ("weight_quant_128x128", "weight_quant_128x128_dual"):
            try:
                got, ref = getattr(quant, name)(w, backend="triton"), getattr(quant, name)(w, backend="torch")
                diffs = [int((g.view(torch.uint8) != r.view(torch.uint8)).sum()) if g.dtype == torch.float8_e4m3fn
                         else float((g.float() - r.float()).abs().max()) for g, r in zip(got, ref)]
                print(f"{name} {dtype}: diffs {diffs}")
            except Exception as e:  # noqa: BLE001
                print(f"{name} {dtype}: ERROR {type(e).__name__}: {str(e)[:200]}")


def check_model():
    from coscale.config import get_preset
    from coscale.fp8 import convert_to_fp8
    from coscale.model import DeepseekForCausalLM

    torch.manual_seed(0)
    model = convert_to_fp8(DeepseekForCausalLM(get_preset("small")).cuda()) or None
    if model is None:
        print("convert_to_fp8 returned None")
        return
    bad = []

    def hook(name):
        def fn(module, inputs, output):
            out = output if isinstance(output, tuple) else (output,)
            if not bad and not finite(*[o for o in out if isinstance(o, torch.Tensor)]):
                ins = [i for i in inputs if isinstance(i, torch.Tensor)]
                bad.append(f"{name} ({type(module).__name__}) inputs finite {finite(*ins)} dtypes "
                           f"{[i.dtype for i in ins]}")
        return fn

    for name, module in model.named_modules():
        module.register_forward_hook(hook(name))
    ids = torch.randint(0, 256, (16, 512), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.compute_loss(ids, torch.roll(ids, -1, 1))
    print("forward loss", out.loss.item(), "main", out.main_loss.item(), "first non-finite:", bad[:1])
    out.loss.backward()
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not finite(p.grad)]
    print("params with non-finite grads:", len(nonfinite), nonfinite[:6])


if __name__ == "__main__":
    check_quant()
    check_model()

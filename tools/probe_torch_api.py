"""Probe which FP8 / grouped GEMM forms the installed torch accepts on this GPU (prints a report).

Run on a GPU machine: `PYTHONPATH=src python tools/probe_torch_api.py`. Each form is tried on
small random inputs and checked against a float32 reference, so the report says what works, not
only what is documented.
"""

import inspect
import traceback

import torch


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def attempt(name, fn):
    try:
        out = fn()
        print(f"OK   {name}: {out}")
    except Exception as e:  # noqa: BLE001 - a probe reports every failure
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"FAIL {name}: {type(e).__name__}: {msg}")


def signature(fn):
    try:
        return str(inspect.signature(fn))
    except (ValueError, TypeError):
        try:
            return "; ".join(str(s) for s in torch._C._jit_get_schemas_for_operator("aten::" + fn.__name__))
        except Exception:  # noqa: BLE001
            return "(no signature)"


def main():
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
    try:
        import triton

        print("triton", triton.__version__)
    except ImportError:
        print("triton missing")
    dev = "cuda"
    M, N, K = 256, 384, 512
    a = torch.randn(M, K, device=dev)
    b = torch.randn(N, K, device=dev)
    ref = a @ b.t()
    f8 = torch.float8_e4m3fn
    print("_scaled_mm signature:", signature(torch._scaled_mm) if hasattr(torch, "_scaled_mm") else None)
    if hasattr(torch.nn.functional, "scaled_mm"):
        print("F.scaled_mm signature:", signature(torch.nn.functional.scaled_mm))
    # 1x128 scales for a (per row, per 128 cols), 128x128 for b
    sa = a.abs().view(M, K // 128, 128).amax(-1) / 448
    sb = b.abs().view(N // 128, 128, K // 128, 128).amax(dim=(1, 3)) / 448
    qa = (a.view(M, K // 128, 128) / sa[..., None]).view(M, K).to(f8)
    qb = (b.view(N // 128, 128, K // 128, 128) / sb[:, None, :, None]).reshape(N, K).to(f8)

    def blockwise(sa_layout):
        sa_ = sa.t().contiguous().t() if sa_layout == "outer" else sa.contiguous()
        out = torch._scaled_mm(qa, qb.t(), scale_a=sa_, scale_b=sb, out_dtype=torch.bfloat16)
        return f"rel_err {rel_err(out, ref):.4f} strides sa {sa_.stride()}"

    attempt("_scaled_mm blockwise 1x128 x 128x128, sa outer-dim-major", lambda: blockwise("outer"))
    attempt("_scaled_mm blockwise 1x128 x 128x128, sa row-major", lambda: blockwise("row"))
    sbt = sb.t()  # b-side scales transposed
    attempt("_scaled_mm blockwise sb transposed", lambda: rel_err(torch._scaled_mm(
        qa, qb.t(), scale_a=sa.t().contiguous().t(), scale_b=sbt, out_dtype=torch.bfloat16), ref))

    # wgrad form: both operands 1x128 along the contraction (token) dim
    dy = torch.randn(K, M, device=dev)  # [tokens K, out M]... use generic names
    x = torch.randn(K, N, device=dev)
    ref_w = dy.t() @ x  # [M, N], contraction over K tokens
    dyt, xt = dy.t().contiguous(), x.t().contiguous()  # [M, K], [N, K]
    s1 = dyt.abs().view(M, K // 128, 128).amax(-1) / 448
    s2 = xt.abs().view(N, K // 128, 128).amax(-1) / 448
    q1 = (dyt.view(M, K // 128, 128) / s1[..., None]).view(M, K).to(f8)
    q2 = (xt.view(N, K // 128, 128) / s2[..., None]).view(N, K).to(f8)
    attempt("_scaled_mm 1x128 x 1x128 (wgrad), both outer-major", lambda: rel_err(torch._scaled_mm(
        q1, q2.t(), scale_a=s1.t().contiguous().t(), scale_b=s2.t().contiguous().t(),
        out_dtype=torch.bfloat16), ref_w))
    attempt("_scaled_mm 1x128 x 1x128 (wgrad), row-major scales", lambda: rel_err(torch._scaled_mm(
        q1, q2.t(), scale_a=s1, scale_b=s2, out_dtype=torch.bfloat16), ref_w))
    attempt("_scaled_mm 1x128 x 1x128, sb as [K/128, N]", lambda: rel_err(torch._scaled_mm(
        q1, q2.t(), scale_a=s1.t().contiguous().t(), scale_b=s2.t().contiguous(),
        out_dtype=torch.bfloat16), ref_w))
    attempt("_scaled_mm tensorwise", lambda: rel_err(torch._scaled_mm(
        qa, qb.t(), scale_a=torch.tensor(1.0, device=dev), scale_b=torch.tensor(1.0, device=dev),
        out_dtype=torch.bfloat16), (qa.float() @ qb.float().t())))
    attempt("_scaled_mm fp32 out blockwise", lambda: rel_err(torch._scaled_mm(
        qa, qb.t(), scale_a=sa.t().contiguous().t(), scale_b=sb, out_dtype=torch.float32), ref))

    # grouped mm
    E, Mg, Kg, Ng = 4, 64, 256, 128
    if hasattr(torch, "_grouped_mm"):
        print("_grouped_mm signature:", signature(torch._grouped_mm))
        xa = torch.randn(E * Mg, Kg, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, Ng, Kg, device=dev, dtype=torch.bfloat16)
        offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * Mg
        refg = torch.cat([xa[i * Mg:(i + 1) * Mg].float() @ w[i].float().t() for i in range(E)])
        attempt("_grouped_mm 2d x 3d (w.transpose)", lambda: rel_err(torch._grouped_mm(
            xa, w.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16), refg))
        offs_ragged = torch.tensor([16, 16, 80, 256], device=dev, dtype=torch.int32)
        attempt("_grouped_mm ragged offs multiples of 16 incl empty group", lambda: rel_err(torch._grouped_mm(
            xa, w.transpose(-2, -1), offs=offs_ragged), torch.cat([
                xa[0:16].float() @ w[0].float().t(), xa[16:16].float() @ w[1].float().t(),
                xa[16:80].float() @ w[2].float().t(), xa[80:256].float() @ w[3].float().t()])))
        offs_odd = torch.tensor([5, 5, 77, 256], device=dev, dtype=torch.int32)
        attempt("_grouped_mm offs not multiple of 16", lambda: rel_err(torch._grouped_mm(
            xa, w.transpose(-2, -1), offs=offs_odd), torch.cat([
                xa[0:5].float() @ w[0].float().t(), xa[5:77].float() @ w[2].float().t(),
                xa[77:256].float() @ w[3].float().t()])))
        dy = torch.randn(E * Mg, Ng, device=dev, dtype=torch.bfloat16)
        refw = torch.stack([dy[i * Mg:(i + 1) * Mg].float().t() @ xa[i * Mg:(i + 1) * Mg].float() for i in range(E)])
        attempt("_grouped_mm 2d x 2d wgrad (offs along K)", lambda: rel_err(torch._grouped_mm(
            dy.t(), xa, offs=offs), refw))
        attempt("_grouped_mm 2d x 2d wgrad contiguous dy.t()", lambda: rel_err(torch._grouped_mm(
            dy.t().contiguous(), xa, offs=offs), refw))
        attempt("_grouped_mm backward through autograd", lambda: (lambda xx, ww: (torch._grouped_mm(
            xx, ww.transpose(-2, -1), offs=offs).float().sum().backward(), ww.grad.shape)[1])(
            xa.clone().requires_grad_(), w.clone().requires_grad_()))
        attempt("_grouped_mm float32 inputs", lambda: rel_err(torch._grouped_mm(
            xa.float(), w.float().transpose(-2, -1), offs=offs), refg))
    if hasattr(torch, "_scaled_grouped_mm"):
        print("_scaled_grouped_mm signature:", signature(torch._scaled_grouped_mm))
    # model smoke test on GPU with bf16 autocast
    try:
        import time

        from coscale.config import get_preset
        from coscale.model import DeepseekForCausalLM

        cfg = get_preset("small")
        model = DeepseekForCausalLM(cfg).cuda()
        for mod in model.modules():
            if hasattr(mod, "impl"):
                mod.impl = "loop"
        ids = torch.randint(0, cfg.vocab_size, (4, 512), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.compute_loss(ids, ids)
        out.loss.backward()
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model.compute_loss(ids, ids)
            out.loss.backward()
        torch.cuda.synchronize()
        print(f"OK   small model fwd+bwd loop experts bf16 autocast: loss {out.loss.item():.3f} "
              f"{(time.time() - t) / 3 * 1000:.1f} ms/step ({4 * 512 * 3 / (time.time() - t):.0f} tok/s)")
    except Exception:
        traceback.print_exc()


if __name__ == "__main__":
    main()

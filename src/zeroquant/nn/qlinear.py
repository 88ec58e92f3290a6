"""QuantLinear: the drop-in replacement for a float linear layer that stores integer weights (a
QuantizedWeight) and picks one backend per call: the kernel ops, the integer reference, or fake quantization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zeroquant import kernels
from zeroquant.core import quant as Q
from zeroquant.core.config import ActQuant, LinearRule, WeightQuant
from zeroquant.core.errors import ZeroQuantError
from zeroquant.kernels import ops, reference
from zeroquant.kernels.weight_format import KernelWeight, interleavable, interleave, interleaved
from zeroquant.nn.handoff import QuantizedActivation
from zeroquant.nn.quantized_weight import QuantizedWeight


class QuantLinear(nn.Module):
    """Linear layer with group-wise quantized integer weights and optional INT8 activations.

    mode="int"  (default): on CUDA tensors, the Triton kernels (zeroquant.kernels) where they take the
                 format; otherwise the integer reference path, as in mode="ref".
    mode="ref":  integer reference path. Activations are quantized (per token, or with the static
                 calibrated scale), multiplied as int8 x int8 -> int32 per weight group, and dequantized
                 with token scale x group scale; bias added in float. The kernels match it.
    mode="fake": dequantize the weight, quantize-dequantize the activation, float matmul. Same numbers
                 up to float rounding; used to cross-check and by distillation.
    Weight-only rules (act=None) take the fake path in both modes: the activation stays floating point.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight: WeightQuant,
        act: ActQuant | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.wq, self.aq = weight, act
        self.mode = "int"
        # Activation applied to the output (fused into the GEMM epilogue on CUDA); set by zeroquant.fuse,
        # which removes the model's own activation module. Not saved: fuse() sets it again after loading.
        self.act: str | None = None
        # This linear's place among those a FusedNorm runs as one packed GEMM (zeroquant.models.fusion): its output then
        # comes with its input (handoff.QuantizedActivation.packed_output). Set by zeroquant.fuse; not saved.
        self.packed_slot: int | None = None
        self.packed = weight.bits <= 4
        groups = 1 if weight.per_tensor else Q.num_groups(in_features, weight.group_size)
        qdtype = Q.storage_dtype(weight.bits, weight.symmetric)
        if self.packed:
            if in_features % 2:
                raise ZeroQuantError(f"INT4 weights need an even input size, got {in_features}")
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=qdtype))
        # [N, G] tensors stored G-major (a transposed view): the kernels read [G, N] rows, so they use these
        # buffers in place instead of keeping a second copy on the GPU. Float16 INT4 ones against INT8 tokens
        # are interleaved (weight_format.interleavable). Saving writes them contiguous.
        sdtype = getattr(torch, weight.scale_dtype)
        self.register_buffer("w_scale", torch.ones(groups, out_features, dtype=sdtype).t())
        zero = None if weight.symmetric else torch.zeros(groups, out_features, dtype=sdtype).t()
        self.register_buffer("w_zero", zero)
        # Progressive INT4: w_scale holds the integer group scales, this the float scale of each row.
        self.register_buffer("w_row_scale", torch.ones(out_features, 1) if weight.progressive else None)
        self.scales_group_major()
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        static = act is not None and not act.dynamic
        self.register_buffer("a_scale", torch.ones(()) if static else None)
        self.register_buffer("a_zero", torch.zeros(()) if static else None)
        # Whether the kernels take this weight and activation format: fixed by the rule, so decided once here
        # rather than on every forward.
        self.kernel_format = (
            not weight.per_tensor and (act is None or (act.dynamic and act.bits == 8))
            and KernelWeight.unsupported(in_features, weight.bits, weight.symmetric, self.group_size) is None)

    SCALE_BUFFERS = ("w_scale", "w_zero", "w_row_scale", "a_scale", "a_zero")

    def scales_group_major(self) -> None:
        """Store w_scale / w_zero G-major (and interleaved where the format says so) again, after a loader
        assigned the file's [N, G] tensors or a device move copied each on its own."""
        s, z = self._buffers["w_scale"], self._buffers.get("w_zero")
        if z is not None and interleavable(self.wq.bits, s.dtype, self.wq.symmetric, self.aq is not None):
            if not interleaved(s.t(), z.t()):
                s, z = interleave(s.t(), z.t())
                self._buffers["w_scale"], self._buffers["w_zero"] = s.t(), z.t()
            return
        for name in ("w_scale", "w_zero"):
            t = self._buffers.get(name)
            if t is not None and t.stride(0) != 1:
                self._buffers[name] = t.t().contiguous().t()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A buffer that is a view into an allocation shared with other linears (zeroquant.nn.packing) is saved
        as its own copy: checkpoints hold each linear's tensors alone, as before packing."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self._buffers.items():
            if t is not None and t.untyped_storage().nbytes() > t.numel() * t.element_size():
                destination[prefix + name] = t.detach().clone()

    def _apply(self, fn, recurse=True):
        """Follow device moves but keep scales and zero points in their stored dtype (float32, or float16 where
        the rule chose it) through model.half()/.to(dtype): rounding float32 ones would change every output."""
        kept = {n: self._buffers[n] for n in self.SCALE_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            self._buffers[n] = old.to(self._buffers[n].device)
        self.scales_group_major()
        return self

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def from_float(cls, module: nn.Linear, rule: LinearRule,
                   act_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantLinear:
        """Round-to-nearest quantization of an nn.Linear (other layouts: from_weight)."""
        if not isinstance(module, nn.Linear):
            raise ZeroQuantError(f"from_float takes an nn.Linear, got {type(module).__name__}: give its [out, in] "
                                 "weight to QuantLinear.from_weight")
        return cls.from_weight(module.weight, module.bias, rule, act_range)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rule: LinearRule,
                    act_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantLinear:
        """Round-to-nearest quantization of a float linear's weight [out, in] and bias; `act_range` (min, max)
        of its input for static activation rules."""
        if rule.weight is None:
            raise ZeroQuantError("activation-only quantization is not supported; give a weight rule")
        w = weight.detach()
        out_f, in_f = w.shape
        b = bias
        ql = cls(in_f, out_f, b is not None, rule.weight, rule.act, dtype=w.dtype)
        ql.to(w.device)
        ql.set_weight(w)
        if b is not None:
            ql.bias.copy_(b.detach())
        if ql.a_scale is not None:
            if act_range is None:
                raise ZeroQuantError("static activation quantization needs calibration data (calib_data=...)")
            s, z = Q.scale_zero_from_range(act_range[0], act_range[1], rule.act.bits, rule.act.symmetric)
            ql.a_scale.copy_(s)
            ql.a_zero.copy_(z)
        return ql

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> None:
        """Quantize float weight `w` [N, K] into the buffers; scale/zero default to RTN from w's range."""
        wq = self.wq
        s, z = scale, zero
        if wq.progressive:  # the row scale comes from the weight; given group scales must be multiples of it
            self.w_row_scale.copy_(Q.progressive_row_scale(w))
        if s is None or z is None:
            s0, z0 = Q.weight_scale_zero(w, wq.bits, wq.group_size, wq.symmetric, wq.per_tensor, wq.progressive)
            s = s0 if s is None else s
            z = z0 if z is None else z
        s = Q.stored_scale(s, wq.float_scale_dtype)
        k, gs = self.in_features, self.group_size
        self.set_int_weight(Q.quantize(w, Q.expand_groups(s, k, gs), Q.expand_groups(z, k, gs), wq.bits, wq.symmetric),
                            s, z)

    @torch.no_grad()
    def set_int_weight(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store integer weights q [N, K] (quant.storage_dtype) with their scales and zero points [N, G], as
        a rounding method other than round-to-nearest (zeroquant.algorithms.gptq) produced them."""
        self.qweight.copy_(Q.pack_int4(q, self.wq.symmetric) if self.packed else q)
        if self.w_row_scale is not None:
            scale = self.integer_group_scales(scale, zero)
        self.w_scale.copy_(scale)
        if self.w_zero is not None:
            self.w_zero.copy_(zero)

    def integer_group_scales(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Progressive INT4: the integer group scales s2 behind float group scales [N, G] (s1 * s2, with s1 this
        layer's row scale), refused unless they are exactly that and keep every level inside int8."""
        s2 = (scale.float() / self.w_row_scale).round()
        if not (torch.equal(s2 * self.w_row_scale, scale.float()) and Q.progressive_fits(s2, zero.float())):
            raise ZeroQuantError("progressive (int8) scales must be whole multiples (1..16) of the row scale with "
                                 "every level inside int8 (zeroquant.core.quant.progressive_group)")
        return s2
    # ---------------------------------------------------------------------------------------- weights

    @property
    def group_size(self) -> int:
        """Input channels per weight group (the whole row for per-row and per-tensor scales); when it does
        not divide in_features the last group is shorter."""
        return self.in_features if self.wq.per_tensor else Q.group_len(self.in_features, self.wq.group_size)

    @property
    def quantized(self) -> QuantizedWeight:
        """The weight as integers, scales and zero points, with its dequantized, int8 and kernel views."""
        return QuantizedWeight(self.qweight, self.w_scale, self.w_zero, self.wq.bits, self.group_size,
                               self.wq.symmetric, self.w_row_scale)

    # ---------------------------------------------------------------------------------------- forward

    def backend(self, x: torch.Tensor) -> str:
        """What forward(x) runs: "kernel" (the kernel ops: Triton on CUDA), "int" (the integer reference) or
        "fake" (float math on the dequantized weight and fake-quantized input)."""
        if self.uses_kernels(x):
            return "kernel"
        return "fake" if self.aq is None or self.mode == "fake" else "int"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend(x)
        if backend == "kernel":
            return self._forward_kernel(x)
        x = x.float_value() if isinstance(x, QuantizedActivation) else x
        return self._forward_int(x) if backend == "int" else self._forward_fake(x)

    def uses_kernels(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs the kernel ops (else a reference path)."""
        if self.mode != "int" or not kernels.runs_on(x):
            return False
        # INT8 activations: any float input (float32 models too: the GEMM is int8 either way). Weight-only
        # formats feed x to an fp16/bf16 tensor-core dot.
        halves = (torch.float16, torch.bfloat16)
        return x.dtype in ((*halves, torch.float32) if self.aq else halves) and self.kernel_format

    def takes_int8(self, x: torch.Tensor) -> bool:
        """Whether forward(x) multiplies a token-wise INT8 copy of x (made here, or handed over with x by the op
        that made it: zeroquant.nn.handoff)."""
        return self.aq is not None and self.uses_kernels(x)

    # The kernel backend --------------------------------------------------------------------------------

    def int8_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in token-wise INT8 form (q, scale): the copy handed over with x, else quantized now."""
        if isinstance(x, QuantizedActivation):
            handed = x.int8()
            if handed is not None:
                return handed
            x = x.float_value()
        return ops.quantize_per_token(x)

    def forward_quantized(self, q: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The kernel GEMM on an input in token-wise INT8 form (q [..., K], s [..., 1]); only where takes_int8."""
        return ops.quant_linear(q, s, self.qweight, self.w_scale, self.w_zero, self.wq.bits, self.group_size,
                                self.bias, self.act, out_dtype, self.w_row_scale)

    def _forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_slot is not None and isinstance(x, QuantizedActivation):
            y = x.packed_output(self.packed_slot, self.out_features)  # one packed GEMM ran for every consumer
            if y is not None:
                return y
        if self.aq is None:
            return ops.quant_linear(x, None, self.qweight, self.w_scale, self.w_zero, self.wq.bits, self.group_size,
                                    self.bias, self.act, x.dtype, self.w_row_scale)
        return self.forward_quantized(*self.int8_input(x), x.dtype)

    # The reference backends ----------------------------------------------------------------------------

    def _forward_fake(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized.dequantize(x.dtype)
        if self.act is None:
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(self.fake_quant_input(x), w, b)
        y = F.linear(self.fake_quant_input(x), w).float()
        y = y if self.bias is None else y + self.bias.float()
        return reference.apply_act(y, self.act).to(x.dtype)

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is None:
            return x
        if self.aq.dynamic:
            return Q.fake_quantize_per_token(x, self.aq.bits)
        return Q.fake_quantize(x, self.a_scale.to(x.dtype), self.a_zero.to(x.dtype), self.aq.bits, self.aq.symmetric)

    def _forward_int(self, x: torch.Tensor) -> torch.Tensor:
        x8, sx, cx = self._quantize_input(x.reshape(-1, self.in_features))
        y = reference.int_linear(x8, sx, cx, *self.quantized.int8(), self.bias, self.act, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """int8 activation x8, its scale ([M, 1] or []) and an integer offset c (an int32 scalar tensor, None
        for 0) with x ~= (x8 + c) * scale.

        Asymmetric (uint8, zero point z) values are stored shifted to int8, q - 128, with c = 128 - z, so the
        GEMM stays int8 x int8 and the offset becomes a cheap rank-1 correction, as in integer kernels. c stays
        a tensor, never a Python int, so that torch.compile traces this without a graph break.
        """
        if self.aq.dynamic:
            q, s = Q.quantize_per_token(x, self.aq.bits)
            return q, s, None
        q = Q.quantize(x, self.a_scale, self.a_zero, self.aq.bits, self.aq.symmetric)
        if self.aq.symmetric:
            return q, self.a_scale, None
        return (q.to(torch.int16) - 128).to(torch.int8), self.a_scale, (128 - self.a_zero).to(torch.int32)

    def extra_repr(self) -> str:
        w = self.wq
        wdesc = f"W{w.bits} " + ("per-tensor" if w.per_tensor else f"g{w.group_size}") + (
            "" if w.symmetric else " asym") + (" progressive" if w.progressive else "")
        a = self.aq
        adesc = "A16" if a is None else f"A{a.bits} " + ("per-token" if a.dynamic else "static")
        act = f", act={self.act}" if self.act else ""
        return f"in={self.in_features}, out={self.out_features}, {wdesc}, {adesc}{act}, mode={self.mode}"

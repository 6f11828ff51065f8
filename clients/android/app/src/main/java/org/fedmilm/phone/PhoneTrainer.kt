// UNBUILT SAMPLE (never compiled): see clients/android/README.md.
// Mirrors fedmilm/training/skeleton.py::run_steps with fedmilm/export/runtime.py's
// ExecuTorchEngine and heldout_loss, which are the tested reference.
package org.fedmilm.phone

import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import java.security.SecureRandom
import kotlin.math.ceil

class PhoneTrainer(private val bundle: BundleManifest) {
    private val random = SecureRandom()  // sampling and DP noise never come from the server

    // Every model program loads the bundle's one base file. ExecuTorch's C++ Module takes
    // (program, data file); if the Java binding of the pinned AAR lacks the two-argument load,
    // this is the one line to adapt. (Never verified here: no Android toolchain.)
    private fun load(program: String) = Module.load(bundle.file(program).path, bundle.baseFile.path)

    /**
     * Runs [job] on [examples], starting from the server's [adapter] (manifest order) with this
     * phone's own [personal] tensors written over the initial ones; returns every trained tensor.
     */
    fun run(job: TrainJob, adapter: List<FloatArray>, personal: Map<String, FloatArray>,
            examples: List<Example>): Pair<Map<String, FloatArray>, JobResult> {
        require(examples.isNotEmpty()) { "no training examples on this phone" }
        require(!job.poisson || bundle.hasDp) { "bundle has no dp_grad program" }
        val started = System.nanoTime()
        val grad = if (job.poisson) load("dp_grad") else load("train")
        val adamw = Module.load(bundle.file("adamw").path)
        val keys = bundle.adapter.map { it.programKey }
        var current = adapter.map { it.copyOf() }
        personal.forEach { (key, value) -> value.copyInto(current[keys.indexOf(key)]) }
        val expAvg = bundle.adapter.map { FloatArray(numel(it.shape)) }.toMutableList()
        val expAvgSq = bundle.adapter.map { FloatArray(numel(it.shape)) }.toMutableList()
        var steps = 0; var seen = 0; var tokens = 0; var lossSum = 0.0

        for (batch in plan(job, examples.size)) {
            val grads = bundle.adapter.map { FloatArray(numel(it.shape)) }
            batch.chunked(bundle.microBatch).forEach { rows ->
                val inputs = pad(rows.map { examples[it] })
                val params = current.mapIndexed { i, a -> EValue.from(tensor(a, bundle.adapter[i].shape)) }
                val out = if (job.poisson) {  // clipped per-example sum / batch; noise comes below
                    val zeros = bundle.adapter.map { EValue.from(tensor(FloatArray(numel(it.shape)), it.shape)) }
                    grad.execute("forward", *(params + inputs + zeros).toTypedArray())
                } else {
                    val weight = FloatArray(bundle.microBatch) { if (it < rows.size) 1f / batch.size else 0f }
                    val w = EValue.from(Tensor.fromBlob(weight, longArrayOf(bundle.microBatch.toLong())))
                    grad.execute("forward", *(params + inputs + w).toTypedArray())
                }
                keys.indices.forEach { i -> add(grads[i], out[i].toTensor().dataAsFloatArray) }
                val loss = out.last().toTensor().dataAsFloatArray
                lossSum += if (job.poisson) loss.take(rows.size).sum().toDouble() else loss[0] * batch.size.toDouble()
            }
            if (job.poisson) {  // after the batch's mask; an empty draw is a noise-only step
                val std = job.noiseMultiplier * job.maxGradNorm
                grads.forEach { g -> for (i in g.indices) g[i] += (std * random.nextGaussian() / job.batchSize).toFloat() }
            }
            steps += 1
            val args = mutableListOf(Tensor.fromBlob(floatArrayOf(steps.toFloat()), longArrayOf()))
            listOf(current, grads, expAvg, expAvgSq).forEach { group ->
                group.forEachIndexed { i, a -> args += tensor(a, bundle.adapter[i].shape) }
            }
            val out = adamw.execute("forward", *args.map { EValue.from(it) }.toTypedArray())
            val n = keys.size
            current = (0 until n).map { out[it].toTensor().dataAsFloatArray }
            (0 until n).forEach { expAvg[it] = out[n + it].toTensor().dataAsFloatArray }
            (0 until n).forEach { expAvgSq[it] = out[2 * n + it].toTensor().dataAsFloatArray }
            seen += batch.size
            tokens += batch.sumOf { r -> examples[r].inputIds.size }
        }
        grad.destroy(); adamw.destroy()
        return keys.zip(current).toMap() to JobResult(steps, seen, tokens, lossSum / maxOf(seen, 1),
            (System.nanoTime() - started) / 1e9)
    }

    /** Mean held-out loss per assistant token of the model with [adapter] (every lora_B zero:
     *  the base model), through eval.pte. */
    fun heldoutLoss(adapter: List<FloatArray>, examples: List<Example>): Double {
        val eval = load("eval")
        var total = 0.0; var count = 0L
        examples.chunked(bundle.microBatch).forEach { rows ->
            val params = adapter.mapIndexed { i, a -> EValue.from(tensor(a, bundle.adapter[i].shape)) }
            val out = eval.execute("forward", *(params + pad(rows)).toTypedArray())
            total += out[0].toTensor().dataAsFloatArray[0]; count += out[1].toTensor().dataAsLongArray[0]
        }
        eval.destroy()
        require(count > 0) { "no assistant tokens to evaluate on" }
        return total / count
    }

    /** Example indices per step: shuffled epochs, or Poisson draws (DP-SGD). */
    private fun plan(job: TrainJob, n: Int): List<List<Int>> {
        if (!job.poisson) {
            return (0 until job.epochs).flatMap { (0 until n).shuffled(random).chunked(job.batchSize) }
        }
        val steps = job.epochs * ceil(n / job.batchSize.toDouble()).toInt()
        val rate = minOf(1.0, job.batchSize.toDouble() / n)
        return (0 until steps).map { (0 until n).filter { random.nextDouble() < rate } }
    }

    private fun pad(rows: List<Example>): List<EValue> {
        val b = bundle.microBatch; val t = bundle.seqLen
        val ids = LongArray(b * t) { bundle.padTokenId }
        val mask = LongArray(b * t)
        val labels = LongArray(b * t) { -100 }
        rows.forEachIndexed { r, e ->
            require(e.inputIds.size <= t) { "example longer than the exported sequence length" }
            e.inputIds.copyInto(ids, r * t); e.labels.copyInto(labels, r * t)
            for (i in e.inputIds.indices) mask[r * t + i] = 1
        }
        val shape = longArrayOf(b.toLong(), t.toLong())
        return listOf(EValue.from(Tensor.fromBlob(ids, shape)), EValue.from(Tensor.fromBlob(mask, shape)),
            EValue.from(Tensor.fromBlob(labels, shape)))
    }

    private fun tensor(data: FloatArray, shape: LongArray) = Tensor.fromBlob(data, shape)
    private fun numel(shape: LongArray) = shape.fold(1L) { a, b -> a * b }.toInt()
    private fun add(into: FloatArray, other: FloatArray) { for (i in into.indices) into[i] += other[i] }
}

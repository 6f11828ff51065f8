// UNBUILT SAMPLE (never compiled): see clients/android/README.md.
// Mirrors fedmilm/export/runtime.py::train_with_programs, which is the tested reference.
package org.fedmilm.phone

import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.pytorch.executorch.training.TrainingModule
import java.io.File
import java.security.SecureRandom
import kotlin.math.ceil

class PhoneTrainer(private val bundle: BundleManifest) {
    private val random = SecureRandom()  // sampling and DP noise never come from the server

    /**
     * Runs [job] on [examples], starting from the server's [adapterPtd] with this phone's own
     * [personal] tensors written over the initial ones; returns every trained tensor.
     */
    fun run(job: TrainJob, adapterPtd: File, personal: Map<String, FloatArray>,
            examples: List<Example>): Pair<Map<String, FloatArray>, JobResult> {
        require(examples.isNotEmpty()) { "no training examples on this phone" }
        require(!job.poisson || bundle.hasDp) { "bundle has no dp_grad program" }
        val started = System.nanoTime()
        val train = TrainingModule.load(bundle.file("train").path, adapterPtd.path)
        val adamw = Module.load(bundle.file("adamw").path)
        val dpGrad = if (job.poisson) Module.load(bundle.file("dp_grad").path) else null
        val keys = bundle.adapter.map { it.programKey }
        var adapter: List<FloatArray>? = readAdapter(train, keys, pad(emptyList()))
        personal.forEach { (key, value) -> adapter!![keys.indexOf(key)].let { value.copyInto(it) } }
        writeAdapter(train, keys, adapter!!)
        val expAvg = bundle.adapter.map { FloatArray(numel(it.shape)) }.toMutableList()
        val expAvgSq = bundle.adapter.map { FloatArray(numel(it.shape)) }.toMutableList()
        var steps = 0; var updates = 0; var seen = 0; var tokens = 0; var lossSum = 0.0

        for (batch in plan(job, examples.size)) {
            steps += 1
            if (batch.isEmpty()) continue  // empty Poisson draw
            val grads = bundle.adapter.map { FloatArray(numel(it.shape)) }
            val noiseStd = job.noiseMultiplier * job.maxGradNorm
            batch.chunked(bundle.microBatch).forEachIndexed { index, rows ->
                val inputs = pad(rows.map { examples[it] })
                if (dpGrad == null) {
                    val weight = FloatArray(bundle.microBatch) { if (it < rows.size) 1f / batch.size else 0f }
                    val out = train.executeForwardBackward("forward", *inputs,
                        EValue.from(Tensor.fromBlob(weight, longArrayOf(bundle.microBatch.toLong()))))
                    lossSum += out[0].toTensor().dataAsFloatArray[0] * batch.size
                    val named = train.namedGradients("forward")
                    keys.forEachIndexed { i, k -> add(grads[i], named.getValue(k).dataAsFloatArray) }
                } else {
                    val current = adapter!!
                    val noise = bundle.adapter.map { t ->
                        FloatArray(numel(t.shape)) {
                            if (index == 0) (noiseStd * random.nextGaussian()).toFloat() else 0f
                        }
                    }
                    val args = current.mapIndexed { i, a -> tensor(a, bundle.adapter[i].shape) } +
                        inputs.map { it.toTensor() } +
                        noise.mapIndexed { i, z -> tensor(z, bundle.adapter[i].shape) }
                    val out = dpGrad.execute("forward", *args.map { EValue.from(it) }.toTypedArray())
                    keys.indices.forEach { i -> add(grads[i], out[i].toTensor().dataAsFloatArray) }
                    lossSum += out.last().toTensor().dataAsFloatArray.take(rows.size).sum()
                }
            }
            updates += 1
            val current = adapter!!
            val args = mutableListOf(Tensor.fromBlob(floatArrayOf(updates.toFloat()), longArrayOf()))
            listOf(current, grads, expAvg, expAvgSq).forEach { group ->
                group.forEachIndexed { i, a -> args += tensor(a, bundle.adapter[i].shape) }
            }
            val out = adamw.execute("forward", *args.map { EValue.from(it) }.toTypedArray())
            val n = keys.size
            adapter = (0 until n).map { out[it].toTensor().dataAsFloatArray }
            (0 until n).forEach { expAvg[it] = out[n + it].toTensor().dataAsFloatArray }
            (0 until n).forEach { expAvgSq[it] = out[2 * n + it].toTensor().dataAsFloatArray }
            writeAdapter(train, keys, adapter!!)
            seen += batch.size
            tokens += batch.sumOf { r -> examples[r].inputIds.size }
        }
        val trained = keys.zip(adapter ?: error("no step ran")).toMap()
        train.destroy(); adamw.destroy(); dpGrad?.destroy()
        return trained to JobResult(steps, seen, tokens, lossSum / maxOf(seen, 1),
            (System.nanoTime() - started) / 1e9)
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

    private fun pad(rows: List<Example>): Array<EValue> {
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
        return arrayOf(EValue.from(Tensor.fromBlob(ids, shape)), EValue.from(Tensor.fromBlob(mask, shape)),
            EValue.from(Tensor.fromBlob(labels, shape)))
    }

    /** The adapter as loaded from adapter.ptd: parameters appear after one forward/backward
     *  (here with all-zero example weights, so nothing is learned from it). */
    private fun readAdapter(train: TrainingModule, keys: List<String>, inputs: Array<EValue>): List<FloatArray> {
        val zero = FloatArray(bundle.microBatch)
        train.executeForwardBackward("forward", *inputs,
            EValue.from(Tensor.fromBlob(zero, longArrayOf(bundle.microBatch.toLong()))))
        val params = train.namedParameters("forward")
        return keys.map { params.getValue(it).dataAsFloatArray.copyOf() }
    }

    /** In-place writes into the program's parameters take effect (checked in Python; the JNI
     *  tensors wrap the same native buffers, which is read from its source, not verified). */
    private fun writeAdapter(train: TrainingModule, keys: List<String>, adapter: List<FloatArray>) {
        val params = train.namedParameters("forward")
        keys.forEachIndexed { i, k -> params.getValue(k).dataAsFloatArray.let { adapter[i].copyInto(it) } }
    }

    private fun tensor(data: FloatArray, shape: LongArray) = Tensor.fromBlob(data, shape)
    private fun numel(shape: LongArray) = shape.fold(1L) { a, b -> a * b }.toInt()
    private fun add(into: FloatArray, other: FloatArray) { for (i in into.indices) into[i] += other[i] }
}

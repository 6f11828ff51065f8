// UNBUILT SAMPLE (never compiled): see clients/android/README.md.
// Parses what the tested Python side writes: manifest.json (fedmilm/export/manifest.py) and
// job.json / result.json (fedmilm/export/job.py).
package org.fedmilm.phone

import org.json.JSONObject
import java.io.File

data class AdapterTensor(val programKey: String, val shape: LongArray, val part: String)

data class BundleManifest(
    val dir: File,
    val microBatch: Int,
    val seqLen: Int,
    val padTokenId: Long,
    val adapter: List<AdapterTensor>,
    val hasDp: Boolean,
    val baseFile: File,    // the frozen base every model program loads (shipped once)
    val baseSha256: String,
) {
    fun file(program: String): File = File(dir, "$program.pte")

    companion object {
        const val FORMAT_VERSION = 3

        fun read(dir: File): BundleManifest {
            val json = JSONObject(File(dir, "manifest.json").readText())
            require(json.getInt("format_version") == FORMAT_VERSION) { "unsupported manifest" }
            val tensors = json.getJSONArray("adapter")
            val adapter = (0 until tensors.length()).map { i ->
                val t = tensors.getJSONObject(i)
                val shape = t.getJSONArray("shape")
                AdapterTensor(
                    t.getString("program_key"),
                    LongArray(shape.length()) { shape.getLong(it) },
                    t.getString("part"),
                )
            }
            return BundleManifest(
                dir = dir,
                microBatch = json.getInt("micro_batch"),
                seqLen = json.getInt("seq_len"),
                padTokenId = json.getJSONObject("tokenizer").getLong("pad_token_id"),
                adapter = adapter,
                hasDp = json.getJSONObject("programs").has("dp_grad"),
                baseFile = File(dir, File(json.getJSONObject("base").getString("file")).name),
                baseSha256 = json.getJSONObject("base").getString("sha256"),
            )
        }
    }
}

/** job.json, checked as clients/android/schemas/job.schema.json says (mirrored by hand). */
data class TrainJob(
    val epochs: Int,
    val batchSize: Int,
    val poisson: Boolean,
    val noiseMultiplier: Double,
    val maxGradNorm: Double,
) {
    companion object {
        const val MAX_EPOCHS = 100
        const val MAX_BATCH = 4096

        fun parse(text: String): TrainJob {
            val j = JSONObject(text)
            require(j.getInt("version") == 1) { "unsupported job version" }
            val sampling = j.getString("sampling")
            require(sampling == "shuffle" || sampling == "poisson") { "unknown sampling" }
            val poisson = sampling == "poisson"
            val job = TrainJob(
                epochs = j.getInt("epochs"),
                batchSize = j.getInt("batch_size"),
                poisson = poisson,
                noiseMultiplier = if (poisson) j.getDouble("noise_multiplier") else 0.0,
                maxGradNorm = if (poisson) j.getDouble("max_grad_norm") else 0.0,
            )
            require(job.epochs in 1..MAX_EPOCHS && job.batchSize in 1..MAX_BATCH) {
                "epochs or batch_size out of bounds"
            }
            require(!poisson || (job.noiseMultiplier > 0 && job.maxGradNorm > 0)) {
                "DP jobs need noise_multiplier > 0 and max_grad_norm > 0"
            }
            require(poisson || (j.isNull("noise_multiplier") && j.isNull("max_grad_norm"))) {
                "noise_multiplier and max_grad_norm go with sampling=poisson only"
            }
            return job
        }
    }
}

/** One tokenised interaction; labels are -100 outside assistant tokens. */
data class Example(val inputIds: LongArray, val labels: LongArray)

/** result.json, as clients/android/schemas/result.schema.json says. */
data class JobResult(val steps: Int, val examples: Int, val tokens: Int, val loss: Double,
                     val seconds: Double) {
    fun toJson(): String = JSONObject(mapOf("steps" to steps, "examples" to examples,
        "tokens" to tokens, "loss" to loss, "seconds" to seconds)).toString()
}

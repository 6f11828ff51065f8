// UNBUILT SAMPLE (never compiled): see clients/android/README.md.
// Schedules training only under the device policy of conf/device/default.yaml and moves files
// over the HTTPS bridge of PROTOCOL.md (what clients/reference_phone.py does, tested).
package org.fedmilm.phone

import android.content.Context
import androidx.work.Constraints
import androidx.work.CoroutineWorker
import androidx.work.ExistingPeriodicWorkPolicy
import androidx.work.NetworkType
import androidx.work.PeriodicWorkRequestBuilder
import androidx.work.WorkManager
import androidx.work.WorkerParameters
import java.io.File
import java.util.concurrent.TimeUnit

class TrainWorker(context: Context, params: WorkerParameters) : CoroutineWorker(context, params) {
    override suspend fun doWork(): Result {
        val files = applicationContext.filesDir
        val bridge = Bridge.fromSettings(applicationContext) ?: return Result.failure()
        val enrolment = File(files, "enrolment")  // one-time code, from the owner's QR scan
        if (enrolment.isFile) { bridge.register(enrolment.readText().trim()); enrolment.delete() }
        val offer = bridge.nextJob() ?: return Result.success()  // nothing to do this time
        return try {
            val bundle = BundleManifest.read(bridge.ensureBundle(offer, File(files, "bundles")))
            val adapter = bridge.downloadAdapter(offer, bundle, File(files, "job-${offer.id}.f32"))
            val personal = Personal.load(files, bundle)
            val examples = LocalExamples.read(File(files, "interactions.jsonl"))
            val (trained, result) = PhoneTrainer(bundle).run(offer.job, adapter, personal, examples)
            Personal.save(files, bundle, trained)  // never leaves the phone
            bridge.upload(offer, bundle, adapter, trained, result)  // the global update + counts
            File(files, "job-${offer.id}.f32").delete()
            Result.success()
        } catch (e: Expired) {
            Result.success()  // the round went on without this phone; the next job is new
        } catch (e: java.io.IOException) {
            Result.retry()    // downloads and the upload resume where they stopped
        }
    }

    companion object {
        fun schedule(context: Context) {
            val constraints = Constraints.Builder()
                .setRequiresCharging(true)
                .setRequiredNetworkType(NetworkType.UNMETERED)
                .setRequiresBatteryNotLow(true)
                .setRequiresDeviceIdle(true)
                .build()
            val request = PeriodicWorkRequestBuilder<TrainWorker>(1, TimeUnit.DAYS)
                .setConstraints(constraints).build()
            WorkManager.getInstance(context).enqueueUniquePeriodicWork(
                "fedmilm-train", ExistingPeriodicWorkPolicy.KEEP, request)
        }
    }
}

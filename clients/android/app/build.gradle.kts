// UNBUILT SAMPLE: see ../README.md. Versions are the ones we would start from, not verified.
plugins {
    id("com.android.application") version "8.7.3"
    id("org.jetbrains.kotlin.android") version "2.1.0"
}

android {
    namespace = "org.fedmilm.phone"
    compileSdk = 34
    defaultConfig {
        applicationId = "org.fedmilm.phone"
        minSdk = 28
        targetSdk = 34
        ndk { abiFilters += listOf("arm64-v8a") }
    }
    kotlinOptions { jvmTarget = "17" }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

dependencies {
    implementation("org.pytorch:executorch-android:1.5.1")  // match the exporter (executorch 1.5.1); unverified
    implementation("androidx.work:work-runtime-ktx:2.10.0")
}

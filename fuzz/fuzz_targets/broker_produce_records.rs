#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    semel_broker::fuzzing::produce_records(data);
});

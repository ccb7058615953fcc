# frozen_string_literal: true

RSpec.describe "metrics" do
  it "measures a running sandbox from the host and refuses a stopped one" do
    name = unique_name("metrics")
    sb = Microsandbox::Sandbox.create(name, image: rootfs, memory: 256)
    begin
      m = sb.metrics
      expect(m.memory_bytes).to be > (16 << 20)
      expect(m.memory_limit_bytes).to eq(256 << 20)
      expect(m.uptime_secs).to be > 0
      expect(m.disk_read_bytes).to be >= 0
      expect(m.memory_host_resident_bytes).to eq(m.memory_bytes)
      expect(m.vcpu_time_ns).to be > 0
      expect(m.upper_host_allocated_bytes).to be > 0
      expect(m.timestamp).to be_within(10).of(Time.now)
      expect([m.memory_available_bytes, m.upper_used_bytes, m.upper_free_bytes]).to eq([nil, nil, nil])

      # Relative to the same VM at rest: an absolute share depends on the host's load
      # (on a 2-core host at load 15 a spinning vCPU got 24 %).
      idle = sb.metrics.cpu_percent
      busy = sb.exec_stream("sh", ["-c", "while :; do :; done"])
      sleep 0.5
      spinning = sb.metrics.cpu_percent
      busy.close
      expect(spinning).to be > 10
      expect(spinning).to be > idle + 5

      all = Microsandbox.all_sandbox_metrics
      expect(all[name]).to be_a(Microsandbox::Metrics)

      stream = sb.metrics_stream(interval: 0.3)
      expect(stream).to be_a(Microsandbox::MetricsStream)
      expect(stream).to be_a(Enumerable)
      samples = stream.first(2)
      expect(samples.size).to eq(2)
      expect(samples.last.uptime_secs).to be >= samples.first.uptime_secs
      expect(samples.last.vcpu_time_ns).to be >= samples.first.vcpu_time_ns
      expect(samples.last.timestamp).to be > samples.first.timestamp
      seen = 0
      expect(sb.metrics_stream(interval: 0.3) { |_| break if (seen += 1) == 2 }).to be_nil
      expect(seen).to eq(2)
    ensure
      sb.stop
    end
    expect { sb.metrics }.to raise_error(Microsandbox::SandboxNotRunningError)
    expect(Microsandbox.all_sandbox_metrics).not_to have_key(name)
  end
end

# frozen_string_literal: true

# The return classes of the reference gem 0.9.0 API (API-0.9.0.md, section 2) that need a
# running VM to observe, for the exec, filesystem, metrics and logs areas. The signatures
# and constants are walked in spec/unit/reference_api_spec.rb.
RSpec.describe "reference gem 0.9.0 API: return classes on a real VM" do
  it "returns the reference's classes from exec, streams, fs, metrics and logs" do
    Microsandbox::Sandbox.create(unique_name("refapi"), image: rootfs) do |sb|
      ms = Microsandbox
      expect(sb.name).to be_a(String)
      out = sb.exec("echo", ["hi"], cwd: "/", user: "root", env: { "A" => "1" }, timeout: 30, tty: false, stdin: nil, rlimits: nil)
      expect(out).to be_a(ms::ExecOutput)
      expect([out.exit_code, out.success?, out.failure?, out.stdout, out.to_s]).to eq([0, true, false, "hi\n", "hi\n"])
      expect(sb.shell("exit 3", timeout: 30)).to have_attributes(exit_code: 3, failure?: true)

      handle = sb.shell_stream("echo a; echo b >&2")
      expect(handle).to be_a(ms::ExecHandle)
      expect(handle.id).to be_a(String)
      events = handle.to_a
      expect(events).to all(be_a(ms::ExecEvent))
      expect(events.map(&:type)).to include(:stdout, :stderr, :exited)
      expect(handle.resize(10, 10)).to be_nil
      expect(sb.exec_stream("true").wait).to be_a(ms::ExitStatus).and(have_attributes(exit_code: 0, success?: true))
      expect(sb.exec_stream("echo", ["x"]).collect).to be_a(ms::ExecOutput)

      fs = sb.fs
      expect(fs).to be_a(ms::FS)
      fs.mkdir("/tmp/ref")
      expect(fs.write_stream("/tmp/ref/a") { |sink| sink.write("abc") && 42 }).to eq(42)
      sink = fs.write_stream("/tmp/ref/b")
      expect(sink).to be_a(ms::FsWriteSink)
      sink.write("xyz")
      expect(sink.close).to be_nil
      expect(fs.read("/tmp/ref/b").encoding).to eq(Encoding::BINARY)
      expect(fs.read_text("/tmp/ref/b")).to eq("xyz")
      expect(fs.read_stream("/tmp/ref/a")).to be_a(ms::FsReadStream)
      expect(fs.read_stream("/tmp/ref/a").read).to eq("abc")
      expect(fs.list("/tmp/ref")).to all(be_a(ms::FsEntry))
      expect(fs.list("/tmp/ref").map(&:type)).to eq(%i[file file])
      expect(fs.list("/tmp/ref").map(&:modified)).to all(be_a(Time))
      meta = fs.stat("/tmp/ref/a")
      expect(meta).to be_a(ms::FsMetadata)
      expect([meta.type, meta.readonly?, meta.modified.class]).to eq([:file, false, Time])
      expect(fs.exists?("/tmp/ref/a")).to be(true)
      expect([fs.copy("/tmp/ref/a", "/tmp/ref/c"), fs.rename("/tmp/ref/c", "/tmp/ref/d"), fs.remove("/tmp/ref/d")]).to eq([nil, nil, nil])
      expect(fs.remove_dir("/tmp/ref")).to be_nil

      m = sb.metrics
      expect(m).to be_a(ms::Metrics)
      expect([m.cpu_percent, m.uptime_secs]).to all(be_a(Float))
      expect([m.vcpu_time_ns, m.memory_bytes, m.memory_limit_bytes, m.disk_read_bytes, m.disk_write_bytes,
              m.net_rx_bytes, m.net_tx_bytes]).to all(be_a(Integer))
      expect(m.timestamp).to be_a(Time)
      expect(sb.metrics_stream(interval: 0.5)).to be_a(ms::MetricsStream)

      expect(wait_until(timeout: 10) { sb.logs(sources: ["stdout"]).any? }).to be(true)
      entries = sb.logs
      expect(entries).to all(be_a(ms::LogEntry))
      expect(entries.map(&:source).uniq - %i[stdout stderr system]).to eq([])
      expect(entries.map(&:cursor)).to all(be_a(String))
      expect(sb.log_stream).to be_a(ms::LogStream)
    end
  end
end

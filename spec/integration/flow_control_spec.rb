# frozen_string_literal: true

# Per-session flow control: a consumer that stops reading one session stalls only that
# session; the sandbox's other sessions keep running over the shared agent channel.
RSpec.describe "per-session flow control in a real VM" do
  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  it "lets other sessions finish while one flooding session is not read, then drains it" do
    Microsandbox::Sandbox.create(unique_name("flow"), image: rootfs) do |sb|
      flood = sb.exec_stream("yes", ["flood-flood-flood-flood"])
      # Give the flood time to fill every buffer between the guest and the unread handle.
      sleep 2
      t0 = now
      Timeout.timeout(30) do
        3.times { expect(sb.exec("echo", ["hi"]).stdout).to eq("hi\n") }
        expect(sb.shell_stream("echo streamed; echo err >&2").collect.stdout).to eq("streamed\n")
        expect(sb.fs.read_text("/etc/hostname")).not_to be_empty
      end
      elapsed = now - t0
      warn format("flow: other sessions took %.2fs while the flood was stalled", elapsed) if ENV["FLOW_DEBUG"]
      expect(elapsed).to be < 10

      # The stalled session still works: killing it ends it after what was buffered, and
      # what was buffered is bounded (the flood was held back, not queued).
      flood.kill
      read = 0
      last = nil
      Timeout.timeout(30) do
        flood.each do |ev|
          last = ev
          read += ev.bytes.bytesize
        end
      end
      expect(last).to be_exited
      expect(last.signal).to eq(9)
      expect(read).to be > 0
      expect(read).to be < 8 * 1024 * 1024
    end
  end

  it "keeps streaming at full speed when the consumer reads" do
    Microsandbox::Sandbox.create(unique_name("flow"), image: rootfs) do |sb|
      # 32 MiB through the window: every byte arrives, in order of the guest's writes.
      out = sb.shell("head -c 33554432 /dev/zero | tr '\\0' 'z'")
      expect(out.stdout.bytesize).to eq(32 * 1024 * 1024)
      expect(out.stdout.count("z")).to eq(32 * 1024 * 1024)
      # A process that exits with output still held back by a slow reader loses none of it.
      handle = sb.shell_stream("head -c 2000000 /dev/zero | tr '\\0' 'q'; echo done")
      sleep 2 # the shell has exited; most of its output waits for credit in the guest
      got = +""
      handle.each do |ev|
        got << ev.bytes if ev.stdout?
        sleep 0.05 # slower than the agent's 1 s grace after the shell's exit
      end
      expect(got.bytesize).to eq(2_000_005)
      expect(got).to end_with("qdone\n")
      expect(handle.exit_code).to eq(0)
    end
  end

  it "never holds back the main process, whose output the supervisor reads itself" do
    script = "head -c 8388608 /dev/zero; touch /tmp/main-done"
    Microsandbox::Sandbox.create(unique_name("flow-main"), image: rootfs, entrypoint: ["/bin/sh", "-c", script]) do |sb|
      # 8 MiB is many windows: it only finishes if the supervisor returns credit.
      expect(wait_until(timeout: 60) { sb.fs.exists?("/tmp/main-done") }).to be(true)
    end
  end
end

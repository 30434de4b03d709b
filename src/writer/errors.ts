/**
 * Refusals of the credential writer (`kube-svid-proxy writer`): a `WriterError` with a stable code.
 */
import { formatProblems, type YamlProblem } from '../config/yaml.ts';
import { KspError } from '../spiffe/errors.ts';

export const WriterErrorCode = {
  /** `writer.yaml` is invalid, or the Kubernetes credential it names is unusable; `writer` does not start. */
  Config: 'ERR_WRITER_CONFIG',
  /** No X.509-SVID to write: the Workload API has given none, or withdrew it; the Secrets are left as they are. */
  NoSvid: 'ERR_WRITER_NO_SVID',
  /**
   * A managed Secret cannot be written as asked: it does not exist (the writer never creates one), its `config`
   * is not the JSON object Argo CD reads, or no bundle of the configured trust domain is at hand.
   */
  Secret: 'ERR_WRITER_SECRET',
  /** kube-apiserver refused or failed a read or write of a managed Secret (the status is in the message). */
  Kubernetes: 'ERR_WRITER_KUBERNETES',
} as const;

export type WriterErrorCode = (typeof WriterErrorCode)[keyof typeof WriterErrorCode];

export class WriterError extends KspError {
  declare readonly code: WriterErrorCode;

  constructor(code: WriterErrorCode, message: string, options?: ErrorOptions) {
    super(code, message, options);
    this.name = 'WriterError';
  }
}

/** `writer.yaml` refused as a whole: every problem with its line and column, one a line. */
export class WriterConfigError extends WriterError {
  readonly file: string;
  readonly problems: readonly YamlProblem[];

  constructor(file: string, problems: readonly YamlProblem[]) {
    super(WriterErrorCode.Config, formatProblems(file, problems));
    this.name = 'WriterConfigError';
    this.file = file;
    this.problems = problems;
  }
}
